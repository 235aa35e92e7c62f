"""Batches for SFT: which samples train together, and how they are laid out in tensors.

A batch plan is fixed up front from the samples' token lengths and the seed, so every rank
knows its batches and a resumed run skips exactly the batches it already trained on.

Packing lays a batch's samples end to end in rows. Position ids restart at 0 for every sample
and no attention mask is passed: transformers then keeps attention within each sample, with
flash-attention's varlen kernels (which it uses only for a batch of one row, so a flash micro
batch is one row) or a block-diagonal causal mask built row by row (rows of at most `capacity`
tokens). A packed batch computes the same loss as the same samples padded, one per row.
"""

from __future__ import annotations

import random
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import torch
import torch.utils.checkpoint

IGNORE = -100
# Length grouping sorts samples within windows of this many batches, so batches hold similar
# lengths but the order of the data stays random at a larger scale (as HF's LengthGroupedSampler).
GROUP_WINDOW = 50


def plan_epoch(lengths: list[int], batch_size: int, seed: int, epoch: int, group_by_length: bool) -> list[list[int]]:
    """The epoch's batches of sample indices: shuffled with (seed, epoch), optionally grouped by length."""
    order = list(range(len(lengths)))
    rng = random.Random(f"{seed}:{epoch}")
    rng.shuffle(order)
    if group_by_length:
        window = batch_size * GROUP_WINDOW
        order = [i for start in range(0, len(order), window)
                 for i in sorted(order[start:start + window], key=lambda j: -lengths[j])]
    batches = [order[i:i + batch_size] for i in range(0, len(order), batch_size)]
    if group_by_length:
        rng.shuffle(batches)  # otherwise each window would start with its longest batch
    return batches


def pad_plan(batches: list[list[int]], world: int, grad_accum: int) -> list[list[int]]:
    """An epoch's batches topped up with its first ones to a whole number of optimizer steps on
    every rank (as DistributedSampler pads) rather than cut: a round that kept few traces still
    trains on all of them. Step s of the epoch is batches [s*world*grad_accum, (s+1)*world*grad_accum)."""
    unit = world * grad_accum
    return batches + [batches[i % len(batches)] for i in range(-len(batches) % unit)]


def rank_batches(padded: list[list[int]], rank: int, world: int) -> list[list[int]]:
    """This rank's share of a padded plan, in order."""
    return padded[rank::world]


def step_normalizer(padded: list[list[int]], target_weights: list[float], step: int, world: int,
                    grad_accum: int) -> float:
    """The divisor that makes each micro batch's loss a share of the optimizer step's loss, the
    weighted mean over every target token of every micro batch of every rank in the step.
    Every rank computes it from the plan, without communication. accelerate/DeepSpeed divide by
    the accumulation steps and average over ranks, so the divisor is scaled back by both."""
    unit = world * grad_accum
    total = sum(target_weights[i] for batch in padded[step * unit:(step + 1) * unit] for i in batch)
    return max(total, 1e-8) / unit


def pack_rows(lengths: list[int], capacity: int) -> list[list[int]]:
    """Positions (into `lengths`) grouped into as few rows of at most `capacity` tokens as the
    total needs, balanced: longest first, each into the least filled row it fits. A micro batch's
    rows are padded to the widest, so even rows waste less than rows filled one after another."""
    if any(n > capacity for n in lengths):
        raise ValueError(f"a sample of {max(lengths)} tokens does not fit a row of {capacity}")
    rows: list[list[int]] = [[] for _ in range(-(-sum(lengths) // capacity))]
    load = [0] * len(rows)
    for i in sorted(range(len(lengths)), key=lambda j: -lengths[j]):
        fits = [r for r in range(len(rows)) if load[r] + lengths[i] <= capacity]
        if not fits:
            rows.append([])
            load.append(0)
            fits = [len(rows) - 1]
        r = min(fits, key=lambda k: load[k])
        rows[r].append(i)
        load[r] += lengths[i]
    return rows


@dataclass
class Sample:
    """One tokenized SFT row: ids, labels (IGNORE on the prompt), per-token loss weights, the
    row's weight, and its audio chunks with their cache keys."""

    input_ids: list[int]
    labels: list[int]
    weights: list[float]
    row_weight: float
    audio: list[np.ndarray]
    audio_keys: list[str]


def collate(samples: list[Sample], pad_id: int, packing: bool, capacity: int | None) -> dict:
    """Tensors for one micro batch. Packed: rows of several samples with per-sample positions and
    no attention mask, rows of at most `capacity` tokens (None: one row, as flash-attention needs).
    Unpacked: one sample per row, right-padded, with an attention mask. Audio chunks are listed in
    the order their placeholders appear, row by row."""
    lengths = [len(s.input_ids) for s in samples]
    if not packing:
        layout = [[i] for i in range(len(samples))]
    else:
        layout = [list(range(len(samples)))] if capacity is None else pack_rows(lengths, capacity)
    width = max(sum(lengths[i] for i in row) for row in layout)
    ids, labels, weights, row_weights, positions, mask = [], [], [], [], [], []
    audio, keys = [], []
    for row in layout:
        r_ids, r_labels, r_weights, r_scale, r_pos = [], [], [], [], []
        for i in row:
            s = samples[i]
            r_ids += s.input_ids
            # A sample's first token is never a target: the row's previous token is another sample's.
            r_labels += [IGNORE] + s.labels[1:]
            r_weights += s.weights
            r_scale += [s.row_weight] * len(s.input_ids)
            r_pos += range(len(s.input_ids))
            audio += s.audio
            keys += s.audio_keys
        pad = width - len(r_ids)
        mask.append([1] * len(r_ids) + [0] * pad)
        ids.append(r_ids + [pad_id] * pad)
        labels.append(r_labels + [IGNORE] * pad)
        weights.append(r_weights + [0.0] * pad)
        row_weights.append(r_scale + [0.0] * pad)
        # The padding is a sample of its own (positions from 0), so it attends to nothing real.
        positions.append(r_pos + list(range(pad)))
    real = sum(lengths)
    return {
        "input_ids": torch.tensor(ids),
        "labels": torch.tensor(labels),
        "weights": torch.tensor(weights, dtype=torch.float32),
        "row_weights": torch.tensor(row_weights, dtype=torch.float32),
        "position_ids": torch.tensor(positions),
        "attention_mask": None if packing else torch.tensor(mask),
        "audio": audio,
        "audio_keys": keys,
        "tokens": real,
        "positions": len(layout) * width,
    }


def weighted_loss(hidden: torch.Tensor, head: Callable[[torch.Tensor], torch.Tensor], labels: torch.Tensor,
                  weights: torch.Tensor, row_weights: torch.Tensor | None = None, normalizer: float | None = None,
                  chunk: int = 4096) -> torch.Tensor:
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
        total = total + torch.utils.checkpoint.checkpoint(piece_loss, h[part], y[part], w[part], use_reentrant=False)
    return total / (weights.sum().clamp(min=1e-8) if normalizer is None else normalizer)
