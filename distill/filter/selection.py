"""Selection per prompt: which of a prompt's passing traces the next student learns from.

A prompt's pass rate (share of its samples whose answer is correct) must lie in the configured
band, or none of its traces is kept: the report keeps questions that 3 to 6 of 8 samples get
right, since always-solved ones teach nothing and always-failed ones have nothing to teach.
Among the passing traces of a prompt in the band, up to k are kept by a policy: in sample order,
shortest reasoning first, or most diverse (near-duplicates removed, then farthest-first).

The ground stage asks the same questions before the filter runs (which traces would the filter
keep, so which are worth scoring?), so the decision from grounding measurements lives here too:
both stages call `grounded_results`, `dependence_result` and `item_decision`.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from distill.filter.checks import check_audio_dependence
from distill.filter.config import FilterConfig
from distill.grounding.config import GroundingConfig

_WORD = re.compile(r"\w+")


@dataclass
class Decision:
    kept: list[int]  # indices into the prompt's traces
    dropped: dict[int, str]  # index of a passing trace not kept -> why
    in_band: bool


def shingles(text: str, n: int = 3) -> frozenset[int]:
    """Hashed word n-grams of a text: the unit of near-duplicate comparison."""
    words = _WORD.findall(text.lower())
    return frozenset(hash(tuple(words[i : i + n])) for i in range(max(1, len(words) - n + 1)))


def jaccard(a: frozenset[int], b: frozenset[int]) -> float:
    return len(a & b) / len(a | b) if a or b else 1.0


def select(
    texts: list[str],
    passing: list[int],
    correct: int,
    total: int,
    keep: int,
    policy: str,
    band: tuple[float, float],
    near_duplicate: float,
) -> Decision:
    """Decide which passing traces (indices into `texts`) of one prompt to keep."""
    rate = correct / total if total else 0.0
    if not band[0] <= rate <= band[1]:
        return Decision([], {i: "prompt:pass_rate" for i in passing}, in_band=False)
    dropped: dict[int, str] = {}
    order = list(passing)
    if policy == "shortest":
        order.sort(key=lambda i: (len(texts[i]), i))
    elif policy == "diverse":
        sets = {i: shingles(texts[i]) for i in order}
        unique: list[int] = []
        for i in order:  # in sample order: the first of a group of near-duplicates stays
            if any(jaccard(sets[i], sets[j]) >= near_duplicate for j in unique):
                dropped[i] = "near_duplicate"
            else:
                unique.append(i)
        order = _farthest_first(unique, sets, keep)
    kept = order[:keep]
    dropped.update({i: "over_keep_per_prompt" for i in order[keep:]})
    return Decision(kept, dropped, in_band=True)


def prompt_decision(
    fc: FilterConfig, texts: list[str], results: list[dict[str, str | None]], graded: bool
) -> tuple[Decision, int]:
    """The filter's decision for one prompt from its traces' texts and check results (in sample
    order; indices of the decision are into these lists), and its count of correct answers.
    Without the correctness check (`graded` false) every trace counts as correct."""
    correct = sum(r["correct"] is None for r in results) if graded else len(results)
    passing = [i for i, r in enumerate(results) if not any(r.values())]
    return select(
        texts,
        passing,
        correct,
        len(results),
        fc.keep_per_prompt,
        fc.keep_policy,
        (fc.pass_rate_min, fc.pass_rate_max),
        fc.near_duplicate,
    ), correct


def item_decision(
    fc: FilterConfig, traces: list[dict], results: dict[str, dict[str, str | None]], graded: bool
) -> tuple[list[dict], Decision, int]:
    """The decision for one item's traces (any order; `results`: trace id -> check results):
    (its traces in sample order, which the decision's indices point into, the decision, the
    count of correct answers)."""
    ordered = sorted(traces, key=lambda t: t["sample_index"])
    decision, correct = prompt_decision(
        fc, [t["completion"] for t in ordered], [results[t["trace_id"]] for t in ordered], graded
    )
    return ordered, decision, correct


def grounded_results(
    rules: dict[str, str | None], text_solvable: bool, gc: GroundingConfig
) -> dict[str, str | None]:
    """A trace's check results with the ground stage's two: "text_solvable" (its item is answerable
    from text, rejected under grounding.text_solvable=drop) and an "audio_dependence" slot that
    passes until the trace's score is known (`dependence_result`)."""
    flagged = "grounding:text_solvable" if text_solvable and gc.text_solvable == "drop" else None
    return {**rules, "text_solvable": flagged, "audio_dependence": None}


def dependence_result(record: dict | None, gc: GroundingConfig) -> str | None:
    """The "audio_dependence" result of a trace the selection may keep: its score against the
    thresholds; a trace the ground stage could not score (None) cannot be vouched for."""
    if record is None:
        return "grounding:unscored"
    return check_audio_dependence(record, gc.min_dependence, gc.min_answer_dependence)


def _farthest_first(candidates: list[int], sets: dict[int, frozenset[int]], keep: int) -> list[int]:
    """Order candidates so that each next one is the least similar to those before it."""
    if len(candidates) <= keep:
        return candidates
    chosen = [candidates[0]]
    rest = candidates[1:]
    while rest:
        best = min(rest, key=lambda i: (max(jaccard(sets[i], sets[j]) for j in chosen), i))
        chosen.append(best)
        rest.remove(best)
    return chosen
