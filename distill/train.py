"""SFT entry point: `accelerate launch distill/train.py --config CFG --data F.jsonl --model DIR --out DIR`.

Reads top to bottom: set up (config, accelerator with DeepSpeed ZeRO, model, data), train
(loss on the completion tokens only), save a full checkpoint in the layout vLLM loads. The
finished checkpoint lands in OUT/final atomically; a stage that finds it there is done.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import shutil
import time
from pathlib import Path

import torch

from distill.config import TrainConfig, load_config
from distill.data import audio_cache
from distill.sft_data import SFTDataset, collate, load_rows, weighted_loss


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


def build_accelerator(tcfg: TrainConfig):
    from accelerate import Accelerator, DeepSpeedPlugin
    from accelerate.utils import InitProcessGroupKwargs

    use_cpu = tcfg.device == "cpu" or (tcfg.device == "auto" and not torch.cuda.is_available())
    plugin = None
    if tcfg.zero_stage > 0:
        plugin = DeepSpeedPlugin(
            zero_stage=tcfg.zero_stage,
            gradient_accumulation_steps=tcfg.grad_accum,
            gradient_clipping=tcfg.max_grad_norm,
            zero3_save_16bit_model=True,
        )
    # On CPU the process group must be gloo, or accelerate and DeepSpeed disagree on the world size.
    kwargs = [InitProcessGroupKwargs(backend="gloo")] if use_cpu else []
    return Accelerator(
        deepspeed_plugin=plugin,
        gradient_accumulation_steps=tcfg.grad_accum,
        mixed_precision=tcfg.mixed_precision,
        cpu=use_cpu and plugin is None,
        kwargs_handlers=kwargs,
    )


def lr_lambda(warmup: int, total: int):
    def f(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        progress = (step - warmup) / max(1, total - warmup)
        return 0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))

    return f


def main(argv: list[str] | None = None) -> None:
    from accelerate.utils import set_seed
    from tqdm import tqdm
    from transformers import AutoProcessor, Qwen2AudioForConditionalGeneration

    from distill.tiny_model import save_for_serving

    args = parse_args(argv)
    cfg = load_config(args.config, args.overrides)
    tcfg: TrainConfig = cfg.train if args.section == "train" else cfg.cold_start.train
    out = Path(args.out)
    final = out / "final"
    if final.exists():
        print(f"train: {final} exists, nothing to do")
        return

    accelerator = build_accelerator(tcfg)
    if accelerator.device.type == "cpu":
        torch.set_num_threads(max(1, (os.cpu_count() or 1) // accelerator.num_processes))
    set_seed(tcfg.seed)
    main_proc = accelerator.is_main_process

    processor = AutoProcessor.from_pretrained(args.model)
    model = Qwen2AudioForConditionalGeneration.from_pretrained(args.model, dtype=torch.float32)
    if tcfg.freeze_audio_encoder:
        model.model.audio_tower.requires_grad_(False)
    trainable = [p for p in model.parameters() if p.requires_grad]

    rows = load_rows(args.data)
    dataset = SFTDataset(rows, processor, audio_cache(cfg), tcfg.max_seq_len, tcfg.answer_loss_weight,
                         cfg.sample.generation_prefix)
    pad_id = processor.tokenizer.pad_token_id
    loader = torch.utils.data.DataLoader(
        dataset, batch_size=tcfg.micro_batch_size, shuffle=True, drop_last=len(dataset) >= tcfg.micro_batch_size
        * accelerator.num_processes, collate_fn=lambda b: collate(b, pad_id),
        generator=torch.Generator().manual_seed(tcfg.seed),
    )
    steps_per_epoch = max(1, len(loader) // (accelerator.num_processes * tcfg.grad_accum))
    total_steps = max(1, math.ceil(tcfg.epochs * steps_per_epoch))
    if tcfg.max_steps > 0:
        total_steps = min(total_steps, tcfg.max_steps)

    optimizer = torch.optim.AdamW(trainable, lr=tcfg.learning_rate, weight_decay=tcfg.weight_decay)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lr_lambda(tcfg.warmup_steps, total_steps))
    # The scheduler is not handed to accelerate: its wrapper steps once per process, which would
    # run the schedule num_processes times too fast. It is stepped once per optimizer step below.
    model, optimizer, loader = accelerator.prepare(model, optimizer, loader)

    log_path = out / "log.jsonl"
    if main_proc:
        out.mkdir(parents=True, exist_ok=True)
        log_path.unlink(missing_ok=True)
    bar = tqdm(total=total_steps, desc="train", disable=not main_proc, dynamic_ncols=True)
    model.train()
    step, tokens, start, losses = 0, 0, time.time(), []
    while step < total_steps:
        for batch in loader:
            with accelerator.accumulate(model):
                weights, row_weights = batch.pop("weights"), batch.pop("row_weights")
                labels = batch.pop("labels")
                logits = model(**batch).logits
                loss = weighted_loss(logits, labels, weights, row_weights)
                accelerator.backward(loss)
                if accelerator.sync_gradients and tcfg.zero_stage == 0 and tcfg.max_grad_norm > 0:
                    accelerator.clip_grad_norm_(trainable, tcfg.max_grad_norm)  # DeepSpeed clips itself
                optimizer.step()
                optimizer.zero_grad()
            tokens += int(batch["attention_mask"].sum())
            losses.append(loss.detach())
            if not accelerator.sync_gradients:
                continue
            step += 1
            lr = optimizer.param_groups[0]["lr"]
            scheduler.step()
            mean_loss = accelerator.reduce(torch.stack(losses).mean(), reduction="mean").item()
            losses.clear()
            if main_proc:
                with log_path.open("a") as handle:
                    handle.write(json.dumps({"step": step, "loss": mean_loss, "lr": lr}) + "\n")
            bar.set_postfix(loss=f"{mean_loss:.4f}")
            bar.update(1)
            if step >= total_steps:
                break
    bar.close()
    elapsed = time.time() - start
    total_tokens = int(accelerator.reduce(torch.tensor(tokens, device=accelerator.device), reduction="sum"))

    state = accelerator.get_state_dict(model)
    if main_proc:
        tmp = out / ".final.tmp"
        shutil.rmtree(tmp, ignore_errors=True)
        save_for_serving(accelerator.unwrap_model(model), tmp, state_dict=state)
        summary = {"steps": step, "rows": len(rows), "tokens": total_tokens, "seconds": round(elapsed, 2),
                   "tokens_per_s": round(total_tokens / max(elapsed, 1e-9), 1),
                   "final_loss": mean_loss if step else None, "processes": accelerator.num_processes,
                   "zero_stage": tcfg.zero_stage}
        (tmp / "train_summary.json").write_text(json.dumps(summary, indent=2) + "\n")
        tmp.rename(final)
        print(f"train: {step} steps, {len(rows)} rows, {total_tokens} tokens in {elapsed:.1f}s "
              f"({summary['tokens_per_s']} tok/s), final loss {summary['final_loss']}")
    accelerator.wait_for_everyone()
    accelerator.end_training()


if __name__ == "__main__":
    main()
