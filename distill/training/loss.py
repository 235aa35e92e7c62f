"""The SFT loss: weighted next-token cross-entropy over the completion tokens, and the divisor
that makes every micro batch's loss its share of the optimizer step's; and the per-token
log-probabilities RL's loss is made of."""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.utils.checkpoint

from distill.training.packing import IGNORE


def step_normalizer(
    padded: list[list[int]], target_weights: list[float], step: int, world: int, grad_accum: int
) -> float:
    """The divisor that makes each micro batch's loss a share of the optimizer step's loss, the
    weighted mean over every target token of every micro batch of every rank in the step.
    Every rank computes it from the plan, without communication. accelerate/DeepSpeed divide by
    the accumulation steps and average over ranks, so the divisor is scaled back by both."""
    unit = world * grad_accum
    total = sum(target_weights[i] for batch in padded[step * unit : (step + 1) * unit] for i in batch)
    return max(total, 1e-8) / unit


def weighted_loss(
    hidden: torch.Tensor,
    head: Callable[[torch.Tensor], torch.Tensor],
    labels: torch.Tensor,
    weights: torch.Tensor,
    row_weights: torch.Tensor | None = None,
    normalizer: float | None = None,
    chunk: int = 4096,
) -> torch.Tensor:
    """Next-token cross-entropy over the target tokens, each with its weight (answer tokens may
    weigh more), scaled by its row's weight, divided by `normalizer` (default: the batch's target
    weight). The normalizer leaves the row weights out, so a batch of down-weighted rows moves the
    model less instead of being rescaled back to full strength. `row_weights` is per token, as
    packed rows mix samples.

    `head` turns hidden states into logits (the LM head; identity for logits). It runs only on
    target positions, `chunk` tokens at a time, and each chunk's logits are recomputed in the
    backward pass instead of kept: with a 150k-token vocabulary the logits of a 16k-token trace
    would otherwise take gigabytes."""
    hidden = hidden[:, :-1]
    labels = labels[:, 1:]
    weights = weights[:, 1:] * (labels != IGNORE)
    scaled = weights if row_weights is None else weights * row_weights[:, 1:]
    targets = labels != IGNORE
    h, y, w = hidden[targets], labels[targets], scaled[targets]

    def piece_loss(h_part: torch.Tensor, y_part: torch.Tensor, w_part: torch.Tensor) -> torch.Tensor:
        ce = torch.nn.functional.cross_entropy(head(h_part).float(), y_part, reduction="none")
        return (ce * w_part).sum()

    total = hidden.new_zeros((), dtype=torch.float32)
    for start in range(0, len(y), chunk):
        part = slice(start, start + chunk)
        total = total + torch.utils.checkpoint.checkpoint(
            piece_loss, h[part], y[part], w[part], use_reentrant=False
        )
    return total / (weights.sum().clamp(min=1e-8) if normalizer is None else normalizer)


def token_logprobs(
    hidden: torch.Tensor,
    head: Callable[[torch.Tensor], torch.Tensor],
    labels: torch.Tensor,
    temperature: float,
    chunk: int = 4096,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(log-probability of each target token under logits / temperature, the same at temperature 1
    detached (what vLLM reports, to compare), the target mask), each [rows, positions - 1]. The head
    runs on target positions only, `chunk` at a time, recomputed in the backward pass (the logits
    of a long trace over a 150k vocabulary would take gigabytes)."""
    hidden, labels = hidden[:, :-1], labels[:, 1:]
    targets = labels != IGNORE
    h, y = hidden[targets], labels[targets]

    def piece(h_part: torch.Tensor, y_part: torch.Tensor) -> torch.Tensor:
        logits = head(h_part).float()
        scaled = torch.log_softmax(logits / temperature, dim=-1).gather(1, y_part[:, None])[:, 0]
        if temperature == 1.0:
            return torch.stack([scaled, scaled.detach()])
        raw = torch.log_softmax(logits.detach(), dim=-1).gather(1, y_part[:, None])[:, 0]
        return torch.stack([scaled, raw])

    parts = [
        torch.utils.checkpoint.checkpoint(piece, h[s : s + chunk], y[s : s + chunk], use_reentrant=False)
        for s in range(0, len(y), chunk)
    ]
    flat = torch.cat(parts, dim=1) if parts else hidden.new_zeros((2, 0), dtype=torch.float32)
    zeros = torch.zeros(targets.shape, dtype=torch.float32, device=hidden.device)
    logp = zeros.masked_scatter(targets, flat[0])
    raw = zeros.masked_scatter(targets, flat[1].detach())
    return logp, raw, targets
