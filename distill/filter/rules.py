"""The rule pipeline: every configured check of distill/filter/checks.py on one trace.

Built once per filter stage (patterns compiled, verifier imported, control tokens known), then
called on every trace; returns each check's result, so a rejected trace lists all its reasons.
"""

from __future__ import annotations

import re

from distill.core.prompts import reasoning_tokens, split_trace
from distill.filter import checks
from distill.filter.answers import Tolerance, answer_of, load_verifier
from distill.filter.config import RULE_CHECKS, FilterConfig


class RulePipeline:
    def __init__(self, cfg: FilterConfig, control_tokens: tuple[str, ...]):
        self.cfg = cfg
        self.enabled = tuple(c for c in RULE_CHECKS if c in cfg.checks)
        self.control_tokens = control_tokens
        self.angle_tokens = all(t.startswith("<") for t in control_tokens)
        self.tol = Tolerance(cfg.number_rel_tol, cfg.number_abs_tol)
        self.verifier = load_verifier(cfg.verifier) if cfg.verifier else None
        self.extra_scripts = frozenset(s for s in cfg.allowed_scripts if s != "auto")
        self.auto_scripts = "auto" in cfg.allowed_scripts
        self._disallowed: dict[frozenset[str], re.Pattern] = {}
        # Every language's terms apply, lower-cased like the reasoning they are looked for in;
        # common terms come first, so a grounded trace stops early.
        self.acoustic = tuple(
            dict.fromkeys(t.lower() for terms in cfg.lexical.acoustic_terms.values() for t in terms)
        )
        self.transcript = tuple(
            dict.fromkeys(t.lower() for terms in cfg.lexical.transcript_terms.values() for t in terms)
        )

    def disallowed(self, question: str) -> re.Pattern:
        """The characters a trace for `question` may not use (cached per set of scripts)."""
        allowed = self.extra_scripts | (
            checks.question_scripts(question) if self.auto_scripts else frozenset()
        )
        allowed = allowed or frozenset({"latin"})
        if allowed not in self._disallowed:
            self._disallowed[allowed] = checks.disallowed_pattern(allowed)
        return self._disallowed[allowed]

    def run(self, trace: dict) -> dict[str, str | None]:
        """Check name -> None (passed) or the reason it failed, for every enabled check."""
        text = trace["completion"]
        cfg = self.cfg
        # One count of '<' settles the common case: exactly the two think tags and no control token
        # (the tokens all start with '<'), which spares two scans of the whole trace.
        simple = self.angle_tokens and text.count("<") == 2
        parts = split_trace(text, tags_unique=simple)
        answer = None if parts is None else answer_of(parts[1], cfg.answer_tag)
        out: dict[str, str | None] = {}
        for name in self.enabled:
            if name == "finished":
                out[name] = checks.check_finished(trace.get("finish_reason", "stop"))
            elif name == "control_tokens":
                out[name] = (
                    None
                    if simple and parts is not None
                    else checks.check_control_tokens(text, self.control_tokens)
                )
            elif name == "format":
                out[name] = checks.check_format(parts, cfg.min_reasoning_chars)
            elif name == "length":
                out[name] = checks.check_length(
                    reasoning_tokens(trace.get("reasoning_tokens"), text),
                    cfg.min_reasoning_tokens,
                    cfg.max_reasoning_tokens,
                )
            elif name == "language":
                out[name] = checks.check_language(text, self.disallowed(trace.get("question") or ""))
            elif name == "degeneration":
                out[name] = checks.check_degeneration(
                    text, cfg.repeat_window, cfg.max_repeats, cfg.repeat_max_period
                )
            elif name == "self_cognition":
                out[name] = checks.check_self_cognition(text)
            elif name == "correct":
                out[name] = checks.check_correct(
                    answer,
                    trace["reference"],
                    trace.get("choices"),
                    tol=self.tol,
                    verifier=self.verifier,
                    trace=trace,
                )
            elif name == "agreement":
                out[name] = checks.check_agreement(
                    None if parts is None else parts[0],
                    answer,
                    trace.get("choices"),
                    trace["reference"],
                    self.tol,
                )
            else:  # acoustic_terms
                out[name] = checks.check_acoustic_terms(
                    None if parts is None else parts[0],
                    self.acoustic,
                    self.transcript,
                    cfg.lexical.min_acoustic_terms,
                )
        return out


def reward(results: dict[str, str | None], weights: dict[str, float]) -> float:
    """The weighted sum of the checks a trace passed (e.g. 0.8 x correct + 0.2 x format)."""
    return round(sum(w for name, w in weights.items() if name in results and results[name] is None), 6)
