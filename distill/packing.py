"""Batches for SFT: which samples train together, and how they are laid out in tensors.

A batch plan is fixed up front from the samples' token lengths and the seed, so every rank
knows its batches and a resumed run skips exactly the batches it already trained on.

Packing lays a batch's samples end to end in a few rows of at most `capacity` tokens. Position
ids restart at 0 for every sample and no attention mask is passed: transformers then builds
attention that stays within each sample (flash-attention varlen on GPU, a block-diagonal causal
mask otherwise), so a packed batch computes the same loss as its samples one by one, without
spending compute on padding.
"""

from __future__ import annotations

import random
from dataclasses import dataclass

import numpy as np
import torch

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


def rank_batches(batches: list[list[int]], rank: int, world: int, grad_accum: int) -> list[list[int]]:
    """This rank's share of an epoch's batches. Every rank needs the same whole number of
    optimizer steps, so the plan is topped up with its first batches (as DistributedSampler pads)
    rather than cut: a round that kept few traces still trains on all of them."""
    unit = world * grad_accum
    padded = batches + [batches[i % len(batches)] for i in range(-len(batches) % unit)]
    return padded[rank::world]


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


def collate(samples: list[Sample], pad_id: int, packing: bool, capacity: int) -> dict:
    """Tensors for one micro batch. Packed: rows of several samples with per-sample positions and
    no attention mask. Unpacked: one sample per row, right-padded, with an attention mask.
    Audio chunks are listed in the order their placeholders appear, row by row."""
    lengths = [len(s.input_ids) for s in samples]
    layout = pack_rows(lengths, capacity) if packing else [[i] for i in range(len(samples))]
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


def weighted_loss(logits: torch.Tensor, labels: torch.Tensor, weights: torch.Tensor,
                  row_weights: torch.Tensor | None = None) -> torch.Tensor:
    """Next-token cross-entropy over the target tokens, each with its weight (answer tokens may
    weigh more), scaled by its row's weight. The normalizer leaves the row weights out, so a batch
    of down-weighted rows moves the model less instead of being rescaled back to full strength.
    `row_weights` is per row (batch,) or per token (batch, length), as packed rows mix samples."""
    logits = logits[:, :-1].float()
    labels = labels[:, 1:]
    weights = weights[:, 1:] * (labels != IGNORE)
    ce = torch.nn.functional.cross_entropy(
        logits.reshape(-1, logits.size(-1)), labels.clamp(min=0).reshape(-1), reduction="none"
    ).view_as(labels)
    if row_weights is None:
        scaled = weights
    elif row_weights.dim() == 1:
        scaled = weights * row_weights[:, None]
    else:
        scaled = weights * row_weights[:, 1:]
    return (ce * scaled).sum() / weights.sum().clamp(min=1e-8)
