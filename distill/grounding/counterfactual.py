"""Counterfactual audio: the same question heard with something other than its own recording.

Three kinds, each a pure function of the real audio (and, for "swap", of the split):
- "silence": zeros, chunk by chunk;
- "noise": white noise at the recording's RMS level (same loudness, no content);
- "swap": another item's recording, preferably one whose reference answer differs, so the
  counterfactual really changes what the right answer is.
A model whose answer (or trace) is as likely under these as under the real audio is not listening.

Silence and noise come from a small shared bank: lengths are multiples of a step (the chunk's
length rounded down, by less than grounding.bank_seconds; step 0 keeps exact lengths) and noise
levels whole dB (loudness matched within 0.5 dB), and the noise of one (length, level) is the same
array for every clip. The engine prepares each distinct audio input once (on this CPU about 0.1 s
for a 30 s feature window), so a bank of a few dozen inputs instead of one per item
keeps grounding cheap; "swap" reuses recordings the engine already prepared while sampling. The
price: a counterfactual up to one step shorter than the clip (a few audio tokens fewer).
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable, Iterable

import numpy as np

from data_pipelines.items import Item
from distill.grounding.config import KINDS

# How far a swap looks for a partner with another answer (bounds the work on single-answer splits).
SWAP_SEARCH = 64


def stable_seed(*parts: object) -> int:
    """A seed that depends only on its parts (not on the process or the shard layout)."""
    key = "/".join(map(str, parts)).encode()
    return int.from_bytes(hashlib.sha256(key).digest()[:8], "little")


def rms(chunks: list[np.ndarray]) -> float:
    """Root-mean-square level over all chunks of a recording."""
    total = sum(float(np.square(c, dtype=np.float64).sum()) for c in chunks)
    count = sum(c.size for c in chunks)
    return (total / count) ** 0.5 if count else 0.0


def bank_length(samples: int, step: int) -> int:
    """A chunk's length in the shared bank: rounded down to a multiple of `step` samples (never
    longer than the chunk, so never over the model's limit); shorter chunks, and any chunk when
    the step is 0, keep their length."""
    if step <= 0:
        return samples
    return max(min(samples, step), samples // step * step)


def silence(chunks: list[np.ndarray], step: int) -> list[np.ndarray]:
    return [np.zeros(bank_length(c.size, step), dtype=c.dtype) for c in chunks]


def noise(chunks: list[np.ndarray], seed: int, step: int) -> list[np.ndarray]:
    """White noise at the recording's RMS level rounded to whole dB, one array per (length, level)
    and seed (clipped to [-1, 1], which at speech and music levels changes nothing)."""
    level_db = round(20 * np.log10(max(rms(chunks), 1e-10)))
    level = 10 ** (level_db / 20)
    out = []
    for c in chunks:
        length = bank_length(c.size, step)
        white = np.random.default_rng(stable_seed(seed, "noise", length, level_db)).standard_normal(length)
        scale = level / max(rms([white]), 1e-12)
        out.append(np.clip(white * scale, -1.0, 1.0).astype(c.dtype))
    return out


def same_answer(a: Item, b: Item) -> bool:
    """The two items' reference answers are the same (case and surrounding space aside)."""
    return a.answer.strip().lower() == b.answer.strip().lower()


def swap_partners(items: list[Item], seed: int) -> dict[str, Item]:
    """Item id -> the item whose audio stands in for it under "swap".

    Items are put in a seeded order; each takes the next item after it (cyclically) whose reference
    answer differs, or the next item when none of the following SWAP_SEARCH items' does. The result
    depends on the split and the seed only, so every shard and every array task agrees on it.
    """
    if len(items) < 2:
        return {}
    order = sorted(items, key=lambda it: stable_seed(seed, "swap", it.id))
    partners = {}
    for i, item in enumerate(order):
        nxt = order[(i + 1) % len(order)]
        for step in range(1, min(len(order), SWAP_SEARCH + 1)):
            cand = order[(i + step) % len(order)]
            if not same_answer(cand, item):
                nxt = cand
                break
        partners[item.id] = nxt
    return partners


def counterfactual(
    kind: str, chunks: list[np.ndarray], seed: int, step: int, partner_chunks: list[np.ndarray] | None = None
) -> list[np.ndarray]:
    """The counterfactual audio of one kind for a recording given as chunks (`step`: the bank's
    length step in samples)."""
    if kind == "silence":
        return silence(chunks, step)
    if kind == "noise":
        return noise(chunks, seed, step)
    if kind == "swap":
        if partner_chunks is None:
            raise ValueError("swap needs another item's audio (a split of at least two items)")
        return partner_chunks
    raise ValueError(f"unknown counterfactual {kind!r} (known: {', '.join(KINDS)})")


def bank_step(bank_seconds: float, sample_rate: int) -> int:
    """The bank's length step in samples (grounding.bank_seconds)."""
    return round(bank_seconds * sample_rate)


def counterfactual_inputs(
    item: Item,
    real: list[np.ndarray],
    kinds: Iterable[str],
    partners: dict[str, Item],
    load: Callable[[Item], list[np.ndarray]],
    seed: int,
    step: int,
    informative_only: bool = False,
) -> dict[str, list[np.ndarray]]:
    """The item's audio (`real`, as chunks) under each of `kinds`, in order, as the ground stage
    and eval hear it. "swap" plays the partner's recording (`load`ed) and is left out where the
    item has no partner (a one-item split) or, with `informative_only`, one of the same answer,
    which tells nothing when the model answers right."""
    partner = partners.get(item.id)
    out = {}
    for kind in kinds:
        if kind == "swap" and (partner is None or informative_only and same_answer(partner, item)):
            continue
        out[kind] = counterfactual(kind, real, seed, step, load(partner) if kind == "swap" else None)
    return out
