"""Eval scores: pure functions of judged answers (no engine, no files).

pass@k, majority vote, MMAU's standard multiple-choice matching, the test-time scaling verdict
and trace statistics. Each is small enough to test on its edge cases.
"""

from __future__ import annotations

import math
import re
from collections import Counter

from distill.core.stats import distribution


def pass_at_k(n: int, c: int, k: int) -> float:
    """The unbiased pass@k estimate (Chen et al., 2021) from n samples of which c are correct: the
    chance that at least one of k samples drawn without replacement is correct."""
    if not 0 < k <= n:
        raise ValueError(f"pass@{k} needs 1 <= k <= n={n}")
    if n - c < k:
        return 1.0
    return 1.0 - math.comb(n - c, k) / math.comb(n, k)


def majority_vote(keys: list[str | None], correct: list[bool]) -> bool:
    """Whether the most common answer is right. `keys` are canonical answers (None: the sample gave
    none, so it does not vote); a tie goes to the answer given first; no votes at all is wrong."""
    counts = Counter(k for k in keys if k is not None)
    if not counts:
        return False
    top = max(counts.values())
    winner = next(i for i, k in enumerate(keys) if k is not None and counts[k] == top)
    return correct[winner]


_WORD = re.compile(r"\b\w+\b")


def _words(text: str) -> set[str]:
    return set(_WORD.findall(text.lower()))


def mmau_match(answer: str, prediction: str, choices: list[str]) -> bool:
    """MMAU's `string_match` (the benchmark's evaluation script): every word of the right option
    is in the prediction, and no word that only wrong options have is."""
    predicted, right = _words(prediction), _words(answer)
    if not predicted:
        return False
    wrong: set[str] = set()
    for choice in choices:
        words = _words(choice)
        if words != right:
            wrong |= words - right
    return right <= predicted and predicted.isdisjoint(wrong)


def inverted_scaling(curve: dict[int, float], margin: float) -> dict | None:
    """Thinking longer hurts: the accuracy at the largest budget is more than `margin` below the
    best accuracy at a smaller one. Returns where it fell from and to, or None."""
    budgets = sorted(curve)
    if len(budgets) < 2:
        return None
    last = budgets[-1]
    best = max(budgets[:-1], key=lambda b: curve[b])
    if curve[last] < curve[best] - margin:
        return {
            "from_budget": best,
            "from_accuracy": curve[best],
            "to_budget": last,
            "to_accuracy": curve[last],
        }
    return None


def rate(flags: list[bool]) -> float | None:
    return round(sum(flags) / len(flags), 4) if flags else None


def trace_stats(traces: list[dict]) -> dict:
    """Statistics of eval traces, each {"reasoning_tokens", "finish_reason", "checks"} with checks
    from the rule pipeline: reasoning length distribution, and the shares of traces cut at the
    token limit, ill-formed, drifting into another script, and degenerate (loops, whitespace)."""
    checks = [t["checks"] for t in traces]
    return {
        "traces": len(traces),
        "reasoning_tokens": distribution(
            [t["reasoning_tokens"] for t in traces if t["reasoning_tokens"] is not None]
        ),
        "truncated_rate": rate([t["finish_reason"] == "length" for t in traces]),
        "format_error_rate": rate([c.get("format") is not None for c in checks]),
        "language_drift_rate": rate([c.get("language") is not None for c in checks]),
        "degeneration_rate": rate([c.get("degeneration") is not None for c in checks]),
    }
