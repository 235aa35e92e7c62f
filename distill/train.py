"""SFT entry point: `accelerate launch distill/train.py --config CFG --data F.jsonl --model DIR --out DIR`.

A recipe in three parts, read top to bottom in `main`:
- set up: config, accelerator with DeepSpeed ZeRO, the data mix, the model, the batch plan, the
  optimizer, and the saved state to resume from (OUT/checkpoints);
- train: the planned batches of this rank (samples packed, loss on the completion tokens only),
  the training state saved every train.save_steps steps;
- save: a full checkpoint in the layout vLLM loads (the model family's), with its summary, lands
  in OUT/final atomically. A stage that finds it there is done; a stage that finds
  OUT/checkpoints/ resumes from the last one with the same result as an uninterrupted run.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import math
import os
import shutil
import time
from dataclasses import dataclass
from functools import partial
from pathlib import Path

import torch

from distill.config import Config, load_config
from distill.core.files import atomic_write_json
from distill.data import audio_cache
from distill.models.registry import Family, family_of
from distill.training.checkpoints import read_log, resume, save_checkpoint
from distill.training.config import TrainConfig
from distill.training.distributed import basic_optimizer_name, build_accelerator, run_rank
from distill.training.launch import mixed_precision
from distill.training.loss import step_normalizer
from distill.training.mixing import build_mix
from distill.training.model import attention_implementation, build_model, merged_state_dict, use_packing
from distill.training.optim import prepare_optimizer
from distill.training.packing import collate, pad_plan, plan_epoch, plan_ranks, rank_batches
from distill.training.sft_data import SFTDataset, load_rows


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--config", required=True, help="distill YAML config (the run's config.yaml)")
    p.add_argument("--data", required=True, nargs="+", help="SFT rows (JSONL: audio, prompt, completion)")
    p.add_argument("--model", required=True, help="initial model directory")
    p.add_argument("--out", required=True, help="output folder; the checkpoint lands in OUT/final")
    p.add_argument(
        "--section",
        default="train",
        choices=["train", "cold_start.train"],
        help="which TrainConfig of the config to use",
    )
    p.add_argument("overrides", nargs="*", help="key=value config overrides")
    return p.parse_args(argv)


@dataclass
class Setup:
    """What set-up builds for the training loop and the save."""

    args: argparse.Namespace
    tcfg: TrainConfig
    out: Path
    accelerator: object
    family: Family
    rows: list[dict]
    mix_stats: dict
    dataset: SFTDataset
    model: torch.nn.Module
    optimizer: torch.optim.Optimizer
    scheduler: torch.optim.lr_scheduler.LRScheduler
    trainable: list[torch.nn.Parameter]
    trainable_count: int
    attention: str
    packing: bool
    capacity: int | None  # tokens per packed row (None: one row per micro batch)
    pad_id: int
    plan: dict  # what a saved state belongs to
    steps_per_epoch: int

    def epoch_plan(self, epoch: int) -> list[list[int]]:
        """Every rank's micro batches of an epoch, padded to whole optimizer steps."""
        return epoch_plan(self.dataset, self.tcfg, self.accelerator.num_processes, epoch)


def epoch_plan(dataset: SFTDataset, tcfg: TrainConfig, world: int, epoch: int) -> list[list[int]]:
    """Every rank's micro batches of an epoch, padded to whole optimizer steps: each clip's rows on
    one rank with train.rank_by_clip (packing.plan_ranks), else dealt round-robin."""
    lengths, batch, accum = dataset.lengths, tcfg.micro_batch_size, tcfg.grad_accum
    if tcfg.rank_by_clip:
        return plan_ranks(
            lengths, dataset.clip_keys, batch, tcfg.seed, epoch, tcfg.group_by_length, world, accum
        )
    return pad_plan(plan_epoch(lengths, batch, tcfg.seed, epoch, tcfg.group_by_length), world, accum)


def set_up(args: argparse.Namespace, cfg: Config, tcfg: TrainConfig) -> Setup:
    """The accelerator (DeepSpeed ZeRO), the data mix, the model, the batch plan and the optimizer."""
    from accelerate.utils import set_seed
    from transformers import AutoConfig, AutoProcessor

    family = family_of(args.model, "--model")  # before the processor: a CPU install may need its import hooks
    hidden = family.text_config(AutoConfig.from_pretrained(args.model)).hidden_size
    accelerator = build_accelerator(tcfg, hidden)
    if accelerator.device.type == "cpu":
        torch.set_num_threads(max(1, (os.cpu_count() or 1) // accelerator.num_processes))
    set_seed(tcfg.seed)
    world = accelerator.num_processes

    processor = AutoProcessor.from_pretrained(args.model)
    cache = audio_cache(cfg)
    rows, mix_stats = build_mix(
        load_rows(args.data), list(tcfg.mix), cfg, processor.tokenizer, cache, tcfg.seed
    )
    dataset = SFTDataset(
        rows,
        processor,
        cache,
        tcfg.max_seq_len,
        tcfg.answer_loss_weight,
        cfg.sample.generation_prefix,
        partial(family.serving_audio, processor.feature_extractor),
    )
    attention = attention_implementation(tcfg, accelerator.device.type == "cuda")
    # flash-attention keeps samples apart only in a batch of one row (varlen over its sequences):
    # a micro batch packs into a single row there; under a mask, into rows of max_seq_len.
    capacity = None if attention.startswith("flash_attention") else tcfg.max_seq_len
    model = build_model(args.model, processor, tcfg, world, attention)

    steps_per_epoch = len(epoch_plan(dataset, tcfg, world, 0)) // (world * tcfg.grad_accum)
    total_steps = max(1, math.ceil(tcfg.epochs * steps_per_epoch))
    if tcfg.max_steps > 0:
        total_steps = min(total_steps, tcfg.max_steps)
    # What a saved state belongs to: resuming it under another plan would train other batches.
    plan = {
        "world": world,
        "micro_batch_size": tcfg.micro_batch_size,
        "grad_accum": tcfg.grad_accum,
        "seed": tcfg.seed,
        "total_steps": total_steps,
        "group_by_length": tcfg.group_by_length,
        "rank_by_clip": tcfg.rank_by_clip,
        "rows_sha256": hashlib.sha256(json.dumps(rows, sort_keys=True).encode()).hexdigest(),
    }

    trainable = [p for p in model.parameters() if p.requires_grad]
    trainable_count = sum(
        getattr(p, "ds_numel", p.numel()) for p in trainable
    )  # ZeRO-3 loads them partitioned
    model, optimizer, scheduler = prepare_optimizer(accelerator, model, trainable, tcfg, total_steps)
    return Setup(
        args,
        tcfg,
        Path(args.out),
        accelerator,
        family,
        rows,
        mix_stats,
        dataset,
        model,
        optimizer,
        scheduler,
        trainable,
        trainable_count,
        attention,
        use_packing(tcfg, attention),
        capacity,
        processor.tokenizer.pad_token_id,
        plan,
        steps_per_epoch,
    )


@dataclass
class Progress:
    """What the training loop measured (this process's run: after a resume, its part)."""

    step: int
    resumed_at: int
    tokens: int = 0
    positions: int = 0
    seconds: float = 0.0
    loss: float | None = None


def train(s: Setup, step: int) -> Progress:
    """Train from `step` to the plan's total steps over this rank's share of the batch plan,
    logging every optimizer step (OUT/log.jsonl) and saving the state every train.save_steps."""
    from tqdm import tqdm

    accelerator, tcfg, out, plan = s.accelerator, s.tcfg, s.out, s.plan
    rank, world, accum, total_steps = (
        accelerator.process_index,
        accelerator.num_processes,
        tcfg.grad_accum,
        plan["total_steps"],
    )
    main_proc, device = accelerator.is_main_process, accelerator.device
    log_path = out / "log.jsonl"
    if main_proc:
        out.mkdir(parents=True, exist_ok=True)
        # The log keeps the steps the resumed state includes; later lines are trained again.
        log_path.write_text("".join(line + "\n" for line in read_log(log_path, step)))
        atomic_write_json(out / "plan.json", plan)  # `distill status` reads total_steps from it
    bar = tqdm(total=total_steps, initial=step, desc="train", disable=not main_proc, dynamic_ncols=True)
    s.model.train()
    progress, losses, start = Progress(step, step), [], time.time()
    while progress.step < total_steps:
        padded = s.epoch_plan(progress.step // s.steps_per_epoch)
        mine = rank_batches(padded, rank, world)
        for index in range((progress.step % s.steps_per_epoch) * accum, len(mine)):
            batch = collate([s.dataset[i] for i in mine[index]], s.pad_id, s.packing, s.capacity)
            normalizer = step_normalizer(padded, s.dataset.target_weights, index // accum, world, accum)
            with accelerator.accumulate(s.model):
                loss = s.model(
                    **{
                        k: batch[k].to(device)
                        for k in ("input_ids", "position_ids", "labels", "weights", "row_weights")
                    },
                    attention_mask=None
                    if batch["attention_mask"] is None
                    else batch["attention_mask"].to(device),
                    audio=batch["audio"],
                    audio_keys=batch["audio_keys"],
                    normalizer=normalizer,
                )
                accelerator.backward(loss)
                if accelerator.sync_gradients and tcfg.zero_stage == 0 and tcfg.max_grad_norm > 0:
                    accelerator.clip_grad_norm_(s.trainable, tcfg.max_grad_norm)  # DeepSpeed clips itself
                s.optimizer.step()
                s.optimizer.zero_grad()
            progress.tokens += batch["tokens"]
            progress.positions += batch["positions"]
            losses.append(loss.detach())
            if not accelerator.sync_gradients:
                continue
            progress.step += 1
            lr = s.optimizer.param_groups[0]["lr"]
            s.scheduler.step()
            # Each micro batch's loss is its share of the step's loss, scaled by world x accum.
            progress.loss = accelerator.reduce(torch.stack(losses).sum(), reduction="sum").item() / (
                world * accum
            )
            losses.clear()
            if main_proc:
                with log_path.open("a") as handle:
                    handle.write(
                        json.dumps(
                            {
                                "step": progress.step,
                                "loss": progress.loss,
                                "lr": lr,
                                "elapsed_s": round(time.time() - start, 3),
                            }
                        )
                        + "\n"
                    )
            bar.set_postfix(loss=f"{progress.loss:.4f}")
            bar.update(1)
            if tcfg.save_steps and progress.step % tcfg.save_steps == 0 and progress.step < total_steps:
                save_checkpoint(accelerator, out, {"step": progress.step, **plan})
            if progress.step >= total_steps:
                break
    bar.close()
    progress.seconds = time.time() - start
    return progress


def save(s: Setup, progress: Progress) -> None:
    """The whole model (LoRA merged) in the family's vLLM layout, and its summary, to OUT/final."""
    accelerator, tcfg, out = s.accelerator, s.tcfg, s.out
    encoder_cache = accelerator.unwrap_model(s.model).cache
    hits, misses = (encoder_cache.hits, encoder_cache.misses) if encoder_cache else (0, 0)
    counts = accelerator.reduce(
        torch.tensor([progress.tokens, progress.positions, hits, misses], device=accelerator.device),
        reduction="sum",
    )
    tokens, positions, hits, misses = (int(x) for x in counts)
    state = accelerator.get_state_dict(s.model)  # a collective under ZeRO-3: every rank takes part
    if not accelerator.is_main_process:
        return
    state = {k.removeprefix("model."): v for k, v in state.items()}
    inner = accelerator.unwrap_model(s.model).model
    if tcfg.lora.enabled:
        state = merged_state_dict(state, tcfg.lora.alpha, tcfg.lora.r)
        inner = inner.unload()  # the plain model, for its config and class; the weights are `state`
    tmp = out / ".final.tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    s.family.save(inner, tmp, state)
    elapsed, loss = progress.seconds, progress.loss
    summary = {
        "model": s.args.model,
        "data": s.args.data,
        "steps": progress.step,
        "resumed_from_step": progress.resumed_at or None,
        "rows": len(s.rows),
        "mix": s.mix_stats,
        # tokens, seconds and the cache counts cover this process's run (after a resume: its part).
        "tokens": tokens,
        "padded_tokens": positions,
        "padding_share": round(1 - tokens / max(positions, 1), 4),
        "seconds": round(elapsed, 2),
        "tokens_per_s": round(tokens / max(elapsed, 1e-9), 1),
        "final_loss": loss,
        "processes": accelerator.num_processes,
        "zero_stage": tcfg.zero_stage,
        "offload_optimizer": tcfg.offload_optimizer,
        "optimizer": basic_optimizer_name(s.optimizer),
        "packing": s.packing,
        "attention": s.attention,
        "lora": tcfg.lora.enabled,
        "mixed_precision": mixed_precision(tcfg),
        "trainable_parameters": s.trainable_count,
        "encoder_cache": {"hits": hits, "misses": misses} if encoder_cache else None,
        # The main rank's peak of allocated GPU memory (None on CPU).
        "peak_memory_gib": round(torch.cuda.max_memory_allocated() / 2**30, 2)
        if accelerator.device.type == "cuda"
        else None,
    }
    (tmp / "train_summary.json").write_text(json.dumps(summary, indent=2) + "\n")
    tmp.rename(out / "final")
    shutil.rmtree(out / "checkpoints", ignore_errors=True)
    print(
        f"train: {progress.step} steps, {len(s.rows)} rows, {tokens} tokens in {elapsed:.1f}s "
        f"({summary['tokens_per_s']} tok/s, {summary['padding_share']:.1%} padding), final loss {loss}"
    )


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    cfg = load_config(args.config, args.overrides)
    tcfg: TrainConfig = cfg.train if args.section == "train" else cfg.cold_start.train
    out = Path(args.out)
    if (out / "final").exists():
        shutil.rmtree(out / "checkpoints", ignore_errors=True)  # left if a kill came right after the save
        print(f"train: {out / 'final'} exists, nothing to do")
        return
    s = set_up(args, cfg, tcfg)
    progress = train(s, resume(s.accelerator, out, s.plan))
    save(s, progress)
    s.accelerator.wait_for_everyone()
    s.accelerator.end_training()
    if torch.distributed.is_initialized():
        torch.distributed.destroy_process_group()


if __name__ == "__main__":
    run_rank(main, "train")
