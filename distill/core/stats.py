"""Summary statistics the stages report in their stats files."""

from __future__ import annotations

import math


def distribution(values: list[float]) -> dict | None:
    """Count, mean and 10th/50th/90th percentiles (nearest rank) of a list of numbers."""
    if not values:
        return None
    ordered = sorted(values)

    def pct(q: float) -> float:
        return round(ordered[max(0, math.ceil(q * len(ordered)) - 1)], 4)

    return {
        "n": len(ordered),
        "mean": round(sum(ordered) / len(ordered), 4),
        "p10": pct(0.1),
        "p50": pct(0.5),
        "p90": pct(0.9),
    }
