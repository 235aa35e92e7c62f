"""Batches for SFT: which samples train together, and how they are laid out in tensors.

A batch plan is fixed up front from the samples' token lengths and the seed, so every rank
knows its batches and a resumed run skips exactly the batches it already trained on.

Packing lays a batch's samples end to end in rows. Position ids restart at 0 for every sample
and no attention mask is passed: transformers then keeps attention within each sample, with
flash-attention's varlen kernels (which it uses only for a batch of one row, so a flash micro
batch is one row) or a block-diagonal causal mask built row by row (rows of at most `capacity`
tokens). A packed batch computes the same loss (loss.py) as the same samples padded, one per row.
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


def plan_epoch(
    lengths: list[int], batch_size: int, seed: int, epoch: int, group_by_length: bool
) -> list[list[int]]:
    """The epoch's batches of sample indices: shuffled with (seed, epoch), optionally grouped by length."""
    order = list(range(len(lengths)))
    rng = random.Random(f"{seed}:{epoch}")
    rng.shuffle(order)
    if group_by_length:
        window = batch_size * GROUP_WINDOW
        order = [
            i
            for start in range(0, len(order), window)
            for i in sorted(order[start : start + window], key=lambda j: -lengths[j])
        ]
    batches = [order[i : i + batch_size] for i in range(0, len(order), batch_size)]
    if group_by_length:
        rng.shuffle(batches)  # otherwise each window would start with its longest batch
    return batches


def pad_plan(batches: list[list[int]], world: int, grad_accum: int) -> list[list[int]]:
    """An epoch's batches topped up with its first ones to a whole number of optimizer steps on
    every rank (as DistributedSampler pads) rather than cut: a round that kept few traces still
    trains on all of them. Step s of the epoch is batches [s*world*grad_accum, (s+1)*world*grad_accum)."""
    unit = world * grad_accum
    return batches + [batches[i % len(batches)] for i in range(-len(batches) % unit)]


def plan_ranks(
    lengths: list[int],
    clips: list,
    batch_size: int,
    seed: int,
    epoch: int,
    group_by_length: bool,
    world: int,
    grad_accum: int,
) -> list[list[int]]:
    """An epoch's padded plan (as pad_plan returns it) in which every clip's rows go to one rank, so
    that the rank's audio encoder cache computes the clip once. Clips (None: a row without audio,
    its own group) are dealt to ranks heaviest first, each to the rank with the fewest tokens so
    far (ties in a seeded shuffle), which keeps the ranks' token counts even; each rank's
    rows are planned as plan_epoch plans them, its batches topped up with its first ones to the
    longest rank's count (in whole optimizer steps), and the ranks' batches interleaved so that
    rank_batches(plan, rank, world) is rank `rank`'s list. One process (or fewer clips than ranks):
    plan_epoch's plan, padded."""
    groups: dict = {}
    for i, clip in enumerate(clips):
        groups.setdefault(("clip", clip) if clip is not None else ("row", i), []).append(i)
    if world == 1 or len(groups) < world:  # one process, or too few clips to give every rank one
        return pad_plan(plan_epoch(lengths, batch_size, seed, epoch, group_by_length), world, grad_accum)
    order = list(groups)
    # The ranks' rows are the same every epoch (so every epoch has as many steps, which resuming
    # mid-run counts on); each rank's own batches are planned anew per epoch below.
    random.Random(f"{seed}:ranks").shuffle(order)
    order.sort(key=lambda g: -sum(lengths[i] for i in groups[g]))  # stable: the shuffle breaks ties
    members: list[list[int]] = [[] for _ in range(world)]
    load = [0] * world
    for g in order:
        rank = min(range(world), key=lambda r: (load[r], r))
        members[rank] += groups[g]
        load[rank] += sum(lengths[i] for i in groups[g])
    per_rank = []
    for rank, rows in enumerate(members):
        rows.sort()
        local = plan_epoch(
            [lengths[i] for i in rows], batch_size, seed, epoch * world + rank, group_by_length
        )
        per_rank.append([[rows[j] for j in batch] for batch in local])
    count = max(len(b) for b in per_rank)
    count += -count % grad_accum
    for batches in per_rank:
        batches += [batches[i % len(batches)] for i in range(count - len(batches))]
    return [per_rank[rank][s] for s in range(count) for rank in range(world)]


def rank_batches(padded: list[list[int]], rank: int, world: int) -> list[list[int]]:
    """This rank's share of a padded plan, in order."""
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
