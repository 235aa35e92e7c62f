"""RL reward terms: each a pure function of one sampled trace and its rule-check results, weighted
by `rl.rewards` (the defaults reproduce Step-Audio-R1: 0.8 x correct + 0.2 x format).

A trace is a sample row (core/rows.py SampleRow) with, where the stage measured them, its
`judge_score` (0..10, the filter's LLM judge) and its `dependence` (nats per reasoning token,
real audio minus the counterfactual `rl.grounding_against`, from vLLM prompt log-probabilities on
the rollout engine). The rule checks come from the filter's RulePipeline, run once per trace.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import replace

from distill.core.prompts import THINK_CLOSE, reasoning_tokens
from distill.filter.answers import answer_of
from distill.filter.checks import check_correct
from distill.filter.config import FilterConfig
from distill.filter.rules import RulePipeline
from distill.rl.config import REWARD_TERMS, RLConfig

# The rule checks the terms read (the filter's, distill/filter/checks.py).
CHECKS = ["control_tokens", "format", "language", "degeneration", "correct"]

Checks = dict[str, str | None]  # check name -> None (passed) or its reason


def correct(trace: dict, checks: Checks, cfg: RLConfig) -> float:
    """1 when the answer matches the reference (the filter's answer matching), else 0."""
    return float(checks["correct"] is None)


def reasoning_format(trace: dict, checks: Checks, cfg: RLConfig) -> float:
    """1 when the reasoning is present and well formed: one think block first, non-empty, an
    answer after it, no control token (the report's 0.2 term, which keeps reasoning from
    collapsing), else 0."""
    return float(checks["format"] is None and checks["control_tokens"] is None)


def length(trace: dict, checks: Checks, cfg: RLConfig) -> float:
    """1 at rl.length_target reasoning tokens, falling linearly to 0 at none and at twice the target."""
    tokens = reasoning_tokens(trace.get("reasoning_tokens"), trace["completion"])
    if tokens is None:
        return 0.0
    return max(0.0, 1.0 - abs(tokens - cfg.length_target) / cfg.length_target)


def language(trace: dict, checks: Checks, cfg: RLConfig) -> float:
    """-1 for characters outside the question's scripts (the filter's language check), else 0."""
    return -float(checks["language"] is not None)


def degeneration(trace: dict, checks: Checks, cfg: RLConfig) -> float:
    """-1 for a loop or runaway whitespace (the filter's degeneration check), else 0."""
    return -float(checks["degeneration"] is not None)


def judge(trace: dict, checks: Checks, cfg: RLConfig) -> float:
    """The LLM judge's score scaled to 0..1 (0 without one: a failed call earns nothing)."""
    score = trace.get("judge_score")
    return 0.0 if score is None else min(max(float(score) / 10.0, 0.0), 1.0)


def grounding(trace: dict, checks: Checks, cfg: RLConfig) -> float:
    """Audio dependence per reasoning token, clipped to +-rl.grounding_clip and scaled to -1..1:
    reasoning more likely with the real audio than with the counterfactual earns more."""
    dep = trace.get("dependence")
    if dep is None:
        return 0.0
    c = cfg.grounding_clip
    return min(max(float(dep), -c), c) / c


TERMS: dict[str, Callable[[dict, Checks, RLConfig], float]] = {
    "correct": correct,
    "format": reasoning_format,
    "length": length,
    "language": language,
    "degeneration": degeneration,
    "judge": judge,
    "grounding": grounding,
}
assert tuple(TERMS) == REWARD_TERMS, "rl/config.py REWARD_TERMS must list the terms of TERMS"


def overlong(num_tokens: int, cfg: RLConfig) -> float:
    """DAPO's soft over-length punishment: 0 up to max_response_tokens - overlong_buffer, then
    falling linearly to -overlong_penalty at the cap (0 with no buffer)."""
    start = cfg.max_response_tokens - cfg.overlong_buffer
    if not cfg.overlong_buffer or num_tokens <= start:
        return 0.0
    return -cfg.overlong_penalty * min(1.0, (num_tokens - start) / cfg.overlong_buffer)


class Rewards:
    """The weighted terms of `rl.rewards` for traces; built once per RL stage (patterns compiled)."""

    def __init__(self, cfg: RLConfig, filter_cfg: FilterConfig, control_tokens: tuple[str, ...]):
        self.cfg = cfg
        self.weights = {name: w for name, w in cfg.rewards.items() if w}
        self.pipeline = RulePipeline(replace(filter_cfg, checks=CHECKS), control_tokens)

    def checks(self, trace: dict) -> Checks:
        """The rule checks of a trace; a reply with no reasoning block is read whole as the answer
        (and the format term withholds its share)."""
        checks = self.pipeline.run(trace)
        if checks["correct"] is not None and THINK_CLOSE not in trace["completion"]:
            p = self.pipeline
            answer = answer_of(trace["completion"], p.cfg.answer_tag)
            checks["correct"] = check_correct(
                answer, trace["reference"], trace.get("choices"), tol=p.tol, verifier=p.verifier, trace=trace
            )
        return checks

    def right(self, trace: dict) -> bool:
        """Whether the trace's answer is right (what the pass-rate band counts)."""
        return self.checks(trace)["correct"] is None

    def __call__(self, trace: dict) -> dict[str, float]:
        """Each weighted term's value (unweighted; "correct" always), `overlong`, and `reward`:
        their weighted sum."""
        checks = self.checks(trace)
        # "correct" always: the step's accuracy is reported whatever the weights.
        terms = {
            name: TERMS[name](trace, checks, self.cfg) for name in dict.fromkeys(["correct", *self.weights])
        }
        terms["overlong"] = overlong(trace["num_tokens"], self.cfg)
        terms["reward"] = sum(self.weights[n] * terms[n] for n in self.weights) + terms["overlong"]
        return terms
