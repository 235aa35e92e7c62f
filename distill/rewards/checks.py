"""Reward checks: small pure functions of (trace text, reference).

Each check returns None when the trace passes, or a short reason string when it fails; the
reason is what the filter stage counts and writes next to every rejected trace.
"""

from __future__ import annotations

import re
import string

from distill.prompting import split_trace

_PUNCT = str.maketrans("", "", string.punctuation)
_LETTER = re.compile(r"^\(?([a-z])\)?$")
_NEGATION = re.compile(r"\b(not|no|neither|never|isnt|cannot)\b")


def check_format(text: str, min_reasoning_chars: int = 1) -> str | None:
    """One think block first, non-empty reasoning, an answer after it."""
    parts = split_trace(text)
    if parts is None:
        return "format:think_block"
    reasoning, answer = parts
    if len(reasoning) < min_reasoning_chars:
        return "format:empty_reasoning"
    if not answer:
        return "format:no_answer"
    return None


def check_finished(finish_reason: str) -> str | None:
    """A generation cut at max_tokens is not a trace to learn from."""
    return "truncated" if finish_reason == "length" else None


def check_control_tokens(text: str, control_tokens: tuple[str, ...]) -> str | None:
    """Chat or audio control tokens (`<|im_start|>`, `<|AUDIO|>`, ...) inside a trace: the model
    wandered out of its turn, and an audio placeholder in a target would break training."""
    return "control_tokens" if any(tok in text for tok in control_tokens) else None


def normalize(text: str) -> str:
    return " ".join(text.lower().translate(_PUNCT).split())


def extract_answer(text: str) -> str | None:
    """The answer after `</think>` (its first non-empty line), or None if there is no think block."""
    parts = split_trace(text)
    if parts is None:
        return None
    for line in parts[1].splitlines():
        if line.strip():
            return line.strip()
    return None


def answer_matches(answer: str, reference: str, choices: list[str] | None = None) -> bool:
    """Normalized exact match; for multiple choice also the option letter ("B", "(b)") or
    'the answer is X' phrasings that name exactly one option."""
    got, ref = normalize(answer), normalize(reference)
    if got == ref:
        return True
    if not choices:
        return False
    options = [normalize(c) for c in choices]
    letter = _LETTER.match(answer.strip().lower())
    if letter:
        index = ord(letter.group(1)) - ord("a")
        return 0 <= index < len(options) and options[index] == ref
    if _NEGATION.search(got) and not any(_NEGATION.fullmatch(o) for o in options):
        return False  # "not high" names one option and means the other
    named = [o for o in options if re.search(rf"\b{re.escape(o)}\b", got)]
    return named == [ref]


def check_correct(text: str, reference: str, choices: list[str] | None = None) -> str | None:
    answer = extract_answer(text)
    if answer is None:
        return "answer:missing"
    return None if answer_matches(answer, reference, choices) else "answer:wrong"
