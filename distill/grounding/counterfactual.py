"""Counterfactual audio: the same question heard with something other than its own recording.

Three kinds, each a pure function of the real audio (and, for "swap", of the split):
- "silence": zeros of the same length and chunking;
- "noise": white noise at the recording's RMS level (same loudness, no content);
- "swap": another item's recording, preferably one whose reference answer differs, so the
  counterfactual really changes what the right answer is.
A model whose answer (or trace) is as likely under these as under the real audio is not listening.
"""

from __future__ import annotations

import hashlib

import numpy as np

from data_pipelines.items import Item

KINDS = ("silence", "noise", "swap")
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


def silence(chunks: list[np.ndarray]) -> list[np.ndarray]:
    return [np.zeros_like(c) for c in chunks]


def noise(chunks: list[np.ndarray], seed: int) -> list[np.ndarray]:
    """White noise with the recording's chunk lengths and RMS level (clipped to [-1, 1], which at
    speech and music levels changes nothing)."""
    rng = np.random.default_rng(seed)
    level = rms(chunks)
    out = []
    for c in chunks:
        white = rng.standard_normal(c.shape)
        scale = level / max(float(np.sqrt(np.mean(np.square(white)))), 1e-12)
        out.append(np.clip(white * scale, -1.0, 1.0).astype(c.dtype))
    return out


def swap_partners(items: list[Item], seed: int) -> dict[str, Item]:
    """Item id -> the item whose audio stands in for it under "swap".

    Items are put in a seeded order; each takes the next item after it (cyclically) whose reference
    answer differs, or the next item when none of the following SWAP_SEARCH items' does. The result depends on the
    split and the seed only, so every shard and every array task agrees on it.
    """
    if len(items) < 2:
        return {}
    order = sorted(items, key=lambda it: stable_seed(seed, "swap", it.id))
    partners = {}
    for i, item in enumerate(order):
        nxt = order[(i + 1) % len(order)]
        for step in range(1, min(len(order), SWAP_SEARCH + 1)):
            cand = order[(i + step) % len(order)]
            if cand.answer.strip().lower() != item.answer.strip().lower():
                nxt = cand
                break
        partners[item.id] = nxt
    return partners


def counterfactual(kind: str, chunks: list[np.ndarray], seed: int, partner_chunks: list[np.ndarray] | None = None
                   ) -> list[np.ndarray]:
    """The counterfactual audio of one kind for a recording given as chunks."""
    if kind == "silence":
        return silence(chunks)
    if kind == "noise":
        return noise(chunks, seed)
    if kind == "swap":
        if partner_chunks is None:
            raise ValueError("swap needs another item's audio (a split of at least two items)")
        return partner_chunks
    raise ValueError(f"unknown counterfactual {kind!r} (known: {', '.join(KINDS)})")
