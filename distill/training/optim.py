"""The optimizer and the learning-rate schedule of SFT."""

from __future__ import annotations

import math

import torch

from distill.training.config import TrainConfig


def lr_lambda(warmup: int, total: int):
    """Linear warm-up over `warmup` steps, then a cosine down to a tenth of the peak at `total`."""

    def f(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        progress = (step - warmup) / max(1, total - warmup)
        return 0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))

    return f


def prepare_optimizer(
    accelerator, model, trainable: list, tcfg: TrainConfig, total_steps: int, schedule: str = "cosine"
):
    """(model, optimizer, scheduler) prepared by accelerate: AdamW over `trainable`, the rate
    following lr_lambda ("cosine", SFT's) or held ("constant", RL's).
    With the optimizer offloaded, accelerate swaps AdamW for DeepSpeed's CPU Adam, so the schedule
    is built on the optimizer prepare returns. It is not handed to accelerate, whose wrapper steps
    once per process (num_processes times too fast); the loop steps it once per optimizer step."""
    optimizer = torch.optim.AdamW(trainable, lr=tcfg.learning_rate, weight_decay=tcfg.weight_decay)
    model, optimizer = accelerator.prepare(model, optimizer)
    factor = lr_lambda(tcfg.warmup_steps, total_steps) if schedule == "cosine" else (lambda step: 1.0)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, factor)
    accelerator.register_for_checkpointing(scheduler)
    return model, optimizer, scheduler
