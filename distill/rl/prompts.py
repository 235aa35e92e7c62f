"""Which prompts RL learns from, and in which order: the items the round's model solves only
sometimes (rl.band right answers among its sample.n traces), drawn per step from a seeded
permutation of the band, a new one each pass over it. A step's prompts follow from (seed, round,
step) alone, so a resumed stage draws exactly what an uninterrupted one would."""

from __future__ import annotations

import random
from collections import defaultdict
from collections.abc import Callable, Iterable


class EmptyBandError(RuntimeError):
    """No item of the round lies in the pass-rate band: RL has nothing to learn from."""


def pass_counts(traces: Iterable[dict], is_right: Callable[[dict], bool]) -> dict[str, tuple[int, int]]:
    """Per item id: (traces right, traces) over the round's samples."""
    counts: dict[str, list[int]] = defaultdict(lambda: [0, 0])
    for t in traces:
        counts[t["item_id"]][0] += is_right(t)
        counts[t["item_id"]][1] += 1
    return {item: (right, total) for item, (right, total) in counts.items()}


def band_items(counts: dict[str, tuple[int, int]], band: list[int]) -> list[str]:
    """The items with band[0] to band[1] traces right (sorted ids: the band does not depend on the
    order the shards were read in); EmptyBandError, saying how the items fell, when there are none."""
    low, high = band
    items = sorted(item for item, (right, _) in counts.items() if low <= right <= high)
    if not items:
        below = sum(right < low for right, _ in counts.values())
        above = sum(right > high for right, _ in counts.values())
        raise EmptyBandError(
            f"no item has {low} to {high} traces right (rl.band): of {len(counts)} items, {below} "
            f"have fewer and {above} more; RL has nothing to learn from this round"
        )
    return items


def step_prompts(items: list[str], step: int, per_step: int, seed: str) -> list[str]:
    """The `per_step` prompts of step `step` (from 0): the band in a permutation seeded by `seed`
    and the pass over the band, read in order; a step that ends a pass takes the rest from the
    next pass's permutation."""
    chosen: list[str] = []
    position = step * per_step
    while len(chosen) < per_step:
        epoch, offset = divmod(position, len(items))
        order = list(items)
        random.Random(f"{seed}:{epoch}").shuffle(order)
        take = order[offset : offset + per_step - len(chosen)]
        chosen += take
        position += len(take)
    return chosen
