"""SFT entry point: `accelerate launch distill/train.py --config CFG --data F.jsonl --model DIR --out DIR`.

Reads top to bottom: set up (config, accelerator with DeepSpeed ZeRO, data mix, model), plan the
batches, train (loss on the completion tokens only, samples packed), save the training state
every train.save_steps steps, and save a full checkpoint in the layout vLLM loads (the model family's). The finished
checkpoint lands in OUT/final atomically; a stage that finds it there is done, and a stage that
finds OUT/checkpoints/ resumes from the last one with the same result as an uninterrupted run.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import math
import os
import shutil
import sys
import time
from datetime import timedelta
from functools import partial
from pathlib import Path

import torch

from distill.config import load_config
from distill.core.files import atomic_write_json, read_json
from distill.core.schema import ConfigError
from distill.data import audio_cache
from distill.models import family_of
from distill.training.config import TrainConfig
from distill.training.launch import mixed_precision, use_cuda
from distill.training.mixing import build_mix
from distill.training.model import attention_implementation, build_model, merged_state_dict, use_packing
from distill.training.packing import collate, pad_plan, plan_epoch, rank_batches, step_normalizer
from distill.training.sft_data import SFTDataset, load_rows

DEEPSPEED_CONFIGS = Path(__file__).resolve().parents[1] / "configs" / "deepspeed"


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--config", required=True, help="distill YAML config (the run's config.yaml)")
    p.add_argument("--data", required=True, nargs="+", help="SFT rows (JSONL: audio, prompt, completion)")
    p.add_argument("--model", required=True, help="initial model directory")
    p.add_argument("--out", required=True, help="output folder; the checkpoint lands in OUT/final")
    p.add_argument("--section", default="train", choices=["train", "cold_start.train"],
                   help="which TrainConfig of the config to use")
    p.add_argument("overrides", nargs="*", help="key=value config overrides")
    return p.parse_args(argv)


def deepspeed_config(tcfg: TrainConfig, world: int, hidden_size: int) -> dict:
    """The DeepSpeed config: train.deepspeed_config, or configs/deepspeed/zero{2,3}.json for
    train.zero_stage, with every "auto" filled from the train config (so accelerate and DeepSpeed
    agree on batch sizes and precision) and the optimizer offloaded when asked."""
    path = Path(tcfg.deepspeed_config) if tcfg.deepspeed_config else \
        DEEPSPEED_CONFIGS / f"zero{3 if tcfg.zero_stage == 3 else 2}.json"
    config = json.loads(path.read_text())
    zero = config.setdefault("zero_optimization", {})
    if not tcfg.deepspeed_config:
        zero["stage"] = tcfg.zero_stage
    elif zero.get("stage") != tcfg.zero_stage:
        raise ConfigError(f"{path}: zero_optimization.stage={zero.get('stage')} but train.zero_stage="
                          f"{tcfg.zero_stage}; make them agree")
    if tcfg.offload_optimizer:
        zero["offload_optimizer"] = {"device": "cpu", "pin_memory": use_cuda(tcfg)}
    if zero["stage"] == 3:
        zero.setdefault("stage3_gather_16bit_weights_on_model_save", True)  # the checkpoint needs whole weights
    # The batch plan, schedule and resume offsets follow the train config: a JSON may leave these
    # "auto" (filled here) but not set them otherwise.
    auto = {
        "train_micro_batch_size_per_gpu": tcfg.micro_batch_size,
        "gradient_accumulation_steps": tcfg.grad_accum,
        "train_batch_size": tcfg.micro_batch_size * tcfg.grad_accum * world,
        "gradient_clipping": tcfg.max_grad_norm,
    }
    for key, value in auto.items():
        if config.get(key, "auto") == "auto":
            config[key] = value
        elif config[key] != value:
            raise ConfigError(f"{path}: {key}={config[key]} disagrees with the train config ({value}); "
                              f'set it to "auto"')
    precision = mixed_precision(tcfg)
    for key in ("bf16", "fp16"):
        if config.get(key, {}).get("enabled", "auto") == "auto":
            config[key] = {**config.get(key, {}), "enabled": precision == key}
    # DeepSpeed's recommended sizes for these, from the model width (as the HF integration does).
    sizes = {"reduce_bucket_size": hidden_size * hidden_size,
             "stage3_prefetch_bucket_size": int(0.9 * hidden_size * hidden_size),
             "stage3_param_persistence_threshold": 10 * hidden_size}
    zero.update({k: v for k, v in sizes.items() if zero.get(k) == "auto"})
    return config


def bound_collectives(seconds: float) -> timedelta:
    """Make every wait for a peer, at start and in each collective, end after `seconds`. The
    world's group takes the timeout from accelerate, but DeepSpeed reduces gradients in groups of
    its own (torch's new_group), which take torch's default: 30 minutes on gloo, 10 on NCCL."""
    import torch.distributed.distributed_c10d as c10d

    timeout = timedelta(seconds=seconds)
    c10d.default_pg_timeout = timeout
    if isinstance(c10d.default_pg_nccl_timeout, timedelta):  # None where NCCL is not built
        c10d.default_pg_nccl_timeout = timeout
    return timeout


def build_accelerator(tcfg: TrainConfig, hidden_size: int):
    from accelerate import Accelerator, DeepSpeedPlugin
    from accelerate.utils import InitProcessGroupKwargs

    cpu = not use_cuda(tcfg)
    world = int(os.environ.get("WORLD_SIZE", "1"))  # set by accelerate launch (torchrun)
    plugin = None
    if tcfg.zero_stage > 0:
        plugin = DeepSpeedPlugin(hf_ds_config=deepspeed_config(tcfg, world, hidden_size),
                                 zero3_save_16bit_model=True)
    # On CPU the process group must be gloo, or accelerate and DeepSpeed disagree on the world size;
    # a single process has no group to set.
    timeout = bound_collectives(tcfg.collective_timeout_s)
    kwargs = [InitProcessGroupKwargs(backend="gloo" if cpu else "nccl", timeout=timeout)] if world > 1 else []
    return Accelerator(
        deepspeed_plugin=plugin,
        gradient_accumulation_steps=tcfg.grad_accum,
        mixed_precision=mixed_precision(tcfg),
        cpu=cpu and plugin is None,
        kwargs_handlers=kwargs,
    )


def lr_lambda(warmup: int, total: int):
    def f(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        progress = (step - warmup) / max(1, total - warmup)
        return 0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))

    return f


def basic_optimizer_name(optimizer) -> str:
    """The optimizer under accelerate's and DeepSpeed's wrappers (DeepSpeedCPUAdam when offloaded)."""
    while hasattr(optimizer, "optimizer"):
        optimizer = optimizer.optimizer
    return type(optimizer).__name__


def last_checkpoint(out: Path) -> Path | None:
    """The newest complete training state under OUT/checkpoints (progress.json is written last)."""
    done = sorted((out / "checkpoints").glob("step-*/progress.json"))
    return done[-1].parent if done else None


def save_checkpoint(accelerator, out: Path, progress: dict) -> None:
    """Save the full training state (model, optimizer, scheduler, RNG of every rank), then keep
    only this one: the state of one step is all a resume needs."""
    path = out / "checkpoints" / f"step-{progress['step']:08d}"
    accelerator.save_state(str(path))
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        atomic_write_json(path / "progress.json", progress)
        for old in (out / "checkpoints").glob("step-*"):
            if old != path:
                shutil.rmtree(old, ignore_errors=True)
    accelerator.wait_for_everyone()


def read_log(path: Path, upto: int) -> list[str]:
    """The training log's lines up to step `upto` (what a resumed state includes); a line cut short
    by a kill is dropped."""
    lines = []
    for line in path.read_text().splitlines() if path.exists() else []:
        try:
            if json.loads(line)["step"] <= upto:
                lines.append(line)
        except (json.JSONDecodeError, KeyError, TypeError):
            continue
    return lines


def main(argv: list[str] | None = None) -> None:
    from accelerate.utils import set_seed
    from tqdm import tqdm
    from transformers import AutoConfig, AutoProcessor

    args = parse_args(argv)
    cfg = load_config(args.config, args.overrides)
    tcfg: TrainConfig = cfg.train if args.section == "train" else cfg.cold_start.train
    out = Path(args.out)
    final = out / "final"
    if final.exists():
        shutil.rmtree(out / "checkpoints", ignore_errors=True)  # left if a kill came right after the save
        print(f"train: {final} exists, nothing to do")
        return

    family = family_of(args.model, "--model")  # before the processor: a CPU install may need its import hooks
    hidden = family.text_config(AutoConfig.from_pretrained(args.model)).hidden_size
    accelerator = build_accelerator(tcfg, hidden)
    if accelerator.device.type == "cpu":
        torch.set_num_threads(max(1, (os.cpu_count() or 1) // accelerator.num_processes))
    set_seed(tcfg.seed)
    main_proc = accelerator.is_main_process
    rank, world, accum = accelerator.process_index, accelerator.num_processes, tcfg.grad_accum

    processor = AutoProcessor.from_pretrained(args.model)
    cache = audio_cache(cfg)
    rows, mix_stats = build_mix(load_rows(args.data), list(tcfg.mix), cfg, processor.tokenizer, cache, tcfg.seed)
    dataset = SFTDataset(rows, processor, cache, tcfg.max_seq_len, tcfg.answer_loss_weight,
                         cfg.sample.generation_prefix, partial(family.serving_audio, processor.feature_extractor))
    attention = attention_implementation(tcfg, accelerator.device.type == "cuda")
    packing = use_packing(tcfg, attention)
    # flash-attention keeps samples apart only in a batch of one row (varlen over its sequences):
    # a micro batch packs into a single row there; under a mask, into rows of max_seq_len.
    capacity = None if attention.startswith("flash_attention") else tcfg.max_seq_len
    model = build_model(args.model, processor, tcfg, world, attention)
    pad_id = processor.tokenizer.pad_token_id

    def epoch_plan(epoch: int) -> list[list[int]]:
        batches = plan_epoch(dataset.lengths, tcfg.micro_batch_size, tcfg.seed, epoch, tcfg.group_by_length)
        return pad_plan(batches, world, accum)

    steps_per_epoch = len(epoch_plan(0)) // (world * accum)
    total_steps = max(1, math.ceil(tcfg.epochs * steps_per_epoch))
    if tcfg.max_steps > 0:
        total_steps = min(total_steps, tcfg.max_steps)
    # What a saved state belongs to: resuming it under another plan would train other batches.
    plan = {"world": world, "micro_batch_size": tcfg.micro_batch_size, "grad_accum": accum, "seed": tcfg.seed,
            "total_steps": total_steps, "group_by_length": tcfg.group_by_length,
            "rows_sha256": hashlib.sha256(json.dumps(rows, sort_keys=True).encode()).hexdigest()}

    trainable = [p for p in model.parameters() if p.requires_grad]
    trainable_count = sum(getattr(p, "ds_numel", p.numel()) for p in trainable)  # ZeRO-3 loads them partitioned
    optimizer = torch.optim.AdamW(trainable, lr=tcfg.learning_rate, weight_decay=tcfg.weight_decay)
    # With the optimizer offloaded, accelerate swaps AdamW for DeepSpeed's CPU Adam: the schedule
    # is built on the optimizer prepare returns. It is not handed to accelerate, whose wrapper
    # steps once per process (num_processes times too fast); it steps once per optimizer step below.
    model, optimizer = accelerator.prepare(model, optimizer)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lr_lambda(tcfg.warmup_steps, total_steps))
    accelerator.register_for_checkpointing(scheduler)

    step = 0
    log_path = out / "log.jsonl"
    resume = last_checkpoint(out)
    if resume is not None:
        saved = read_json(resume / "progress.json")
        changed = [k for k in plan if saved.get(k) != plan[k]]
        if changed:
            raise RuntimeError(f"{resume}: saved under another training plan ({', '.join(changed)} changed); "
                               f"restore those settings, or delete {out / 'checkpoints'} to start over")
        accelerator.load_state(str(resume))
        step = saved["step"]
        if main_proc:
            print(f"train: resuming from {resume} (step {step} of {total_steps})")
    if main_proc:
        out.mkdir(parents=True, exist_ok=True)
        # The log keeps the steps the resumed state includes; later lines are trained again.
        log_path.write_text("".join(line + "\n" for line in read_log(log_path, step)))
        atomic_write_json(out / "plan.json", plan)  # `distill status` reads total_steps from it
    bar = tqdm(total=total_steps, initial=step, desc="train", disable=not main_proc, dynamic_ncols=True)
    model.train()
    tokens = positions = 0
    start, losses, mean_loss = time.time(), [], None
    resumed_at = step
    while step < total_steps:
        padded = epoch_plan(step // steps_per_epoch)
        mine = rank_batches(padded, rank, world)
        for index in range((step % steps_per_epoch) * accum, len(mine)):
            batch = collate([dataset[i] for i in mine[index]], pad_id, packing, capacity)
            normalizer = step_normalizer(padded, dataset.target_weights, index // accum, world, accum)
            device = accelerator.device
            with accelerator.accumulate(model):
                loss = model(input_ids=batch["input_ids"].to(device), position_ids=batch["position_ids"].to(device),
                             attention_mask=None if batch["attention_mask"] is None
                             else batch["attention_mask"].to(device),
                             audio=batch["audio"], audio_keys=batch["audio_keys"], labels=batch["labels"].to(device),
                             weights=batch["weights"].to(device), row_weights=batch["row_weights"].to(device),
                             normalizer=normalizer)
                accelerator.backward(loss)
                if accelerator.sync_gradients and tcfg.zero_stage == 0 and tcfg.max_grad_norm > 0:
                    accelerator.clip_grad_norm_(trainable, tcfg.max_grad_norm)  # DeepSpeed clips itself
                optimizer.step()
                optimizer.zero_grad()
            tokens += batch["tokens"]
            positions += batch["positions"]
            losses.append(loss.detach())
            if not accelerator.sync_gradients:
                continue
            step += 1
            lr = optimizer.param_groups[0]["lr"]
            scheduler.step()
            # Each micro batch's loss is its share of the step's loss, scaled by world x accum.
            mean_loss = accelerator.reduce(torch.stack(losses).sum(), reduction="sum").item() / (world * accum)
            losses.clear()
            if main_proc:
                with log_path.open("a") as handle:
                    handle.write(json.dumps({"step": step, "loss": mean_loss, "lr": lr,
                                             "elapsed_s": round(time.time() - start, 3)}) + "\n")
            bar.set_postfix(loss=f"{mean_loss:.4f}")
            bar.update(1)
            if tcfg.save_steps and step % tcfg.save_steps == 0 and step < total_steps:
                save_checkpoint(accelerator, out, {"step": step, **plan})
            if step >= total_steps:
                break
    bar.close()
    elapsed = time.time() - start
    encoder_cache = accelerator.unwrap_model(model).cache
    hits, misses = (encoder_cache.hits, encoder_cache.misses) if encoder_cache else (0, 0)
    counts = accelerator.reduce(torch.tensor([tokens, positions, hits, misses], device=accelerator.device),
                                reduction="sum")
    total_tokens, total_positions, hits, misses = (int(x) for x in counts)

    state = accelerator.get_state_dict(model)
    if main_proc:
        state = {k.removeprefix("model."): v for k, v in state.items()}
        inner = accelerator.unwrap_model(model).model
        if tcfg.lora.enabled:
            state = merged_state_dict(state, tcfg.lora.alpha, tcfg.lora.r)
            inner = inner.unload()  # the plain model, for its config and class; the weights are `state`
        tmp = out / ".final.tmp"
        shutil.rmtree(tmp, ignore_errors=True)
        family.save(inner, tmp, state)
        summary = {
            "model": args.model, "data": args.data, "steps": step, "resumed_from_step": resumed_at or None,
            "rows": len(rows), "mix": mix_stats,
            # tokens, seconds and the cache counts cover this process's run (after a resume: its part).
            "tokens": total_tokens, "padded_tokens": total_positions,
            "padding_share": round(1 - total_tokens / max(total_positions, 1), 4), "seconds": round(elapsed, 2),
            "tokens_per_s": round(total_tokens / max(elapsed, 1e-9), 1), "final_loss": mean_loss,
            "processes": world, "zero_stage": tcfg.zero_stage, "offload_optimizer": tcfg.offload_optimizer,
            "optimizer": basic_optimizer_name(optimizer), "packing": packing, "attention": attention,
            "lora": tcfg.lora.enabled, "mixed_precision": mixed_precision(tcfg), "trainable_parameters": trainable_count,
            "encoder_cache": {"hits": hits, "misses": misses} if encoder_cache else None,
        }
        (tmp / "train_summary.json").write_text(json.dumps(summary, indent=2) + "\n")
        tmp.rename(final)
        shutil.rmtree(out / "checkpoints", ignore_errors=True)
        print(f"train: {step} steps, {len(rows)} rows, {total_tokens} tokens in {elapsed:.1f}s "
              f"({summary['tokens_per_s']} tok/s, {summary['padding_share']:.1%} padding), final loss {mean_loss}")
    accelerator.wait_for_everyone()
    accelerator.end_training()
    if torch.distributed.is_initialized():
        torch.distributed.destroy_process_group()


def lost_peers(exc: BaseException) -> bool:
    """Whether a failure is a collective that lost its peers: one timed out, or a peer's connection
    went (gloo says so in a RuntimeError; NCCL and the rendezvous store raise DistError)."""
    import torch.distributed as dist

    return isinstance(exc, dist.DistError) or (isinstance(exc, RuntimeError) and "gloo/transport" in str(exc))


if __name__ == "__main__":
    try:
        main()
        # A finished rank skips interpreter shutdown: there, C++ destructors of gloo's and DeepSpeed's
        # still-joinable threads can abort it with SIGABRT ("terminate called without an active
        # exception") after its work is saved; seen twice in fresh-clone CI (6 December 2026, rank 1
        # of a ZeRO-3 stage after its checkpoint), once even after destroy_process_group.
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(0)
    except Exception as exc:
        if not lost_peers(exc):
            raise
        print(f"train: rank {os.environ.get('RANK', '?')} lost contact with the other ranks and stops: "
              f"{str(exc).splitlines()[0]}\nAnother rank died or hangs (its output says why); a rank waits for "
              "its peers at most train.collective_timeout_s seconds.", file=sys.stderr, flush=True)
        os._exit(1)  # the process group's destructors would wait on the lost peers
