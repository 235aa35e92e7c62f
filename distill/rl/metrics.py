"""What an RL step reports (the round's rl/metrics.jsonl, wandb, the report): the mean reward and
each term, accuracy, the reasoning length (mean and p90: the collapse Step-Audio-R1 warns of must
be visible), the groups dropped for zero variance, and the loss's KL and clip fraction."""

from __future__ import annotations

import numpy as np

from distill.core.prompts import reasoning_tokens


def step_metrics(
    step: int, terms: list[dict[str, float]], traces: list[dict], dropped: int, groups: int
) -> dict:
    """The rollout side of step `step`: `terms` per trace (rewards.Rewards), the traces themselves,
    and how many of the step's `groups` were dropped for zero reward variance."""
    lengths = np.array(
        [reasoning_tokens(t.get("reasoning_tokens"), t["completion"]) or 0 for t in traces], dtype=float
    )
    names = sorted({name for t in terms for name in t})
    return {
        "step": step,
        **{f"reward/{name}": round(float(np.mean([t[name] for t in terms])), 6) for name in names},
        "accuracy": round(float(np.mean([t.get("correct", 0.0) for t in terms])), 6),
        "reasoning_tokens_mean": round(float(lengths.mean()), 2),
        "reasoning_tokens_p90": round(float(np.percentile(lengths, 90)), 2),
        "groups": groups,
        "groups_dropped_zero_variance": dropped,
    }


def collapse_warning(first: float, now: float, fraction: float) -> str | None:
    """A warning when the mean reasoning length fell below `fraction` of the first step's."""
    if fraction and first > 0 and now < fraction * first:
        return (
            f"mean reasoning length fell to {now:.0f} tokens, {now / first:.0%} of the {first:.0f} RL "
            f"started from (below rl.collapse_warn_fraction={fraction}): the reasoning is collapsing; "
            "a format term in rl.rewards holds it (Step-Audio-R1)"
        )
    return None
