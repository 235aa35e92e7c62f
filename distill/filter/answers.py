"""Answer extraction and matching: pure functions of (trace or answer text, reference).

The answer is the text after `</think>` (its first non-empty line), or the content of a
configured answer tag (`<answer>...</answer>`). It is matched against the reference by the
reference's kind: multiple choice (option letter or option text), yes/no, a number (with a
tolerance and units), or free text (normalized exact match); a custom verifier can replace all.
"""

from __future__ import annotations

import importlib
import re
import string
from collections.abc import Callable
from dataclasses import dataclass
from functools import lru_cache

from distill.core.prompts import split_trace

_PUNCT = str.maketrans("", "", string.punctuation)
_ARTICLES = re.compile(r"\b(a|an|the)\b")
_LETTER = re.compile(r"^\(?([a-z])\)?[.:]?$")
_NEGATION = re.compile(r"\b(not|no|neither|never|isnt|cannot)\b")
# A sign only at the start of a word: the hyphen of "C-3" or "20-30" is no minus.
_NUMBER = re.compile(r"(?<![\w.])[-+]?(?:\d+\.?\d*|\.\d+)(?:e[-+]?\d+)?")
_MENTION = re.compile(_NUMBER.pattern + r"(?:\s*[a-z%]+)?")
_THOUSANDS = re.compile(r"(?<=\d),(?=\d{3}(?!\d))")  # "1,200" but not "2,3" or "0,5"
# "Answer: B", "The final answer is yes": the lead-in is not the answer.
_LEAD_IN = re.compile(r"^(?:so,? )?(?:the )?(?:final |correct )?answer(?: is)?\s*[:\-]?\s*", re.IGNORECASE)
_UNIT = re.compile(r"^\s*([a-z%]+)")
_NUMERIC_REFERENCE = re.compile(r"[-+]?(?:\d+\.?\d*|\.\d+)(?:e[-+]?\d+)?\s*([a-z%]+)?")
YES = frozenset({"yes", "yeah", "yep", "true", "correct"})
NO = frozenset({"no", "nope", "false", "incorrect"})
WORD_NUMBERS = {
    w: i
    for i, w in enumerate(
        (
            "zero",
            "one",
            "two",
            "three",
            "four",
            "five",
            "six",
            "seven",
            "eight",
            "nine",
            "ten",
            "eleven",
            "twelve",
            "thirteen",
            "fourteen",
            "fifteen",
            "sixteen",
            "seventeen",
            "eighteen",
            "nineteen",
            "twenty",
        )
    )
}
# Unit -> (dimension, factor to the base unit): "0.5 s" and "500 ms" are the same answer.
UNITS = {
    "hz": ("hz", 1.0),
    "khz": ("hz", 1e3),
    "s": ("s", 1.0),
    "sec": ("s", 1.0),
    "secs": ("s", 1.0),
    "second": ("s", 1.0),
    "seconds": ("s", 1.0),
    "ms": ("s", 1e-3),
    "min": ("s", 60.0),
    "mins": ("s", 60.0),
    "minute": ("s", 60.0),
    "minutes": ("s", 60.0),
    "db": ("db", 1.0),
    "bpm": ("bpm", 1.0),
    "%": ("%", 1.0),
    "percent": ("%", 1.0),
}


@dataclass(frozen=True)
class Tolerance:
    """How close a numeric answer must be: |got - ref| <= abs_tol + rel_tol * |ref|."""

    rel_tol: float = 0.0
    abs_tol: float = 0.0


def normalize(text: str) -> str:
    """Lowercase, no punctuation, no articles, single spaces (SQuAD-style)."""
    return " ".join(_ARTICLES.sub(" ", text.lower().translate(_PUNCT)).split())


def extract_answer(text: str, tag: str = "") -> str | None:
    """The answer of a trace: inside `<tag>...</tag>` after the think block when `tag` is set,
    else the first non-empty line after `</think>`; None without a think block or an answer."""
    parts = split_trace(text)
    return None if parts is None else answer_of(parts[1], tag)


def answer_of(after_think: str, tag: str = "") -> str | None:
    """The answer within the text after `</think>` (see extract_answer)."""
    if tag:
        open_, close = f"<{tag}>", f"</{tag}>"
        start = after_think.find(open_)
        end = after_think.find(close, start + len(open_))
        if start < 0 or end < 0:
            return None
        return after_think[start + len(open_) : end].strip() or None
    for line in after_think.splitlines():
        if line.strip():
            return line.strip()
    return None


@dataclass(frozen=True)
class Quantity:
    value: float  # as written
    unit_factor: float  # to the dimension's base unit (ms -> s: 0.001)
    dimension: str | None  # hz, s, db, bpm, % or None

    @property
    def base(self) -> float:
        return self.value * self.unit_factor


def parse_number(text: str) -> Quantity | None:
    """The first number of `text` with its unit ("0.5 s", "440Hz", "1,200 Hz", "three"), or None."""
    low = _THOUSANDS.sub("", text.lower())
    match = _NUMBER.search(low)
    if match is None:
        for word in normalize(low).split():
            if word in WORD_NUMBERS:
                return Quantity(float(WORD_NUMBERS[word]), 1.0, None)
        return None
    value = float(match.group())
    unit = _UNIT.match(low[match.end() :])
    if unit and unit.group(1) in UNITS:
        dimension, factor = UNITS[unit.group(1)]
        return Quantity(value, factor, dimension)
    return Quantity(value, 1.0, None)


def number_mentions(text: str) -> list[str]:
    """Every number in `text` with the word after it ("4 onsets", "1,200 Hz", "0.31 s")."""
    return _MENTION.findall(_THOUSANDS.sub("", text.lower()))


EXACT = Tolerance()


def numbers_match(answer: str, reference: str, tol: Tolerance = EXACT) -> bool:
    """Same quantity within the tolerance: units converted when both have one ("500 ms" = "0.5 s");
    a bare number is read in the reference's unit ("500" = "500 ms")."""
    got, ref = parse_number(answer), parse_number(reference)
    if got is None or ref is None:
        return False
    if got.dimension and ref.dimension and got.dimension != ref.dimension:
        return False  # 440 Hz is not 440 ms
    a, b = (got.base, ref.base) if got.dimension else (got.value, ref.value)
    return abs(a - b) <= tol.abs_tol + tol.rel_tol * abs(b) + 1e-9 * max(1.0, abs(b))


@lru_cache(maxsize=4096)
def option_patterns(choices: tuple[str, ...]) -> tuple[tuple[str, ...], tuple[re.Pattern | None, ...]]:
    """Normalized options and a whole-word pattern for each (cached: a round asks the same few)."""
    options = tuple(normalize(c) for c in choices)
    return options, tuple(re.compile(rf"\b{re.escape(o)}\b") if o else None for o in options)


def named_option(answer: str, choices: list[str]) -> int | None:
    """The index of the one option an answer names (by letter, or by text named exactly once,
    not negated), or None."""
    got = normalize(answer)
    options, patterns = option_patterns(tuple(choices))
    if got in options:
        return options.index(got)
    letter = _LETTER.match(answer.strip().lower())
    if letter:
        index = ord(letter.group(1)) - ord("a")
        return index if 0 <= index < len(options) else None
    if _NEGATION.search(got) and not any(_NEGATION.fullmatch(o) for o in options):
        return None  # "not high" names one option and means the other
    named = [i for i, p in enumerate(patterns) if p is not None and p.search(got)]
    return named[0] if len(named) == 1 else None


@lru_cache(maxsize=4096)
def _kind(reference: str, has_choices: bool) -> str:
    if has_choices:
        return "choice"
    ref = normalize(reference)
    if ref in YES or ref in NO:
        return "yes_no"
    numeric = _NUMERIC_REFERENCE.fullmatch(_THOUSANDS.sub("", reference.strip().lower()))
    if (numeric and (numeric.group(1) or "") in ("", *UNITS)) or ref in WORD_NUMBERS:
        return "number"
    return "text"


def answer_kind(reference: str, choices: list[str] | None) -> str:
    """How a reference is matched: choice, yes_no, number or text."""
    return _kind(reference, bool(choices))


def answer_matches(
    answer: str, reference: str, choices: list[str] | None = None, tol: Tolerance = EXACT
) -> bool:
    """Whether `answer` gives `reference`, by the reference's kind (see answer_kind)."""
    answer = _LEAD_IN.sub("", answer.strip())
    kind = answer_kind(reference, choices)
    if kind == "choice":
        index = named_option(answer, choices or [])
        return index is not None and option_patterns(tuple(choices or []))[0][index] == normalize(reference)
    if kind == "yes_no":
        words = normalize(answer).split()
        return bool(words) and (words[0] in YES) == (normalize(reference) in YES) and (words[0] in YES | NO)
    if kind == "number":
        return numbers_match(answer, reference, tol)
    return normalize(answer) == normalize(reference)


Verifier = Callable[[str, str, dict], bool]


def load_verifier(path: str) -> Verifier:
    """A custom verifier `package.module:function`, called as f(answer, reference, trace) -> bool."""
    module, _, name = path.partition(":")
    if not module or not name:
        raise ValueError(f"verifier {path!r}: expected 'package.module:function'")
    try:
        fn = getattr(importlib.import_module(module), name)
    except (ImportError, AttributeError) as exc:
        raise ValueError(f"verifier {path!r}: cannot import it ({exc})") from None
    if not callable(fn):
        raise ValueError(f"verifier {path!r}: not callable")
    return fn


def answer_key(answer: str | None, reference: str, choices: list[str] | None = None) -> str | None:
    """A canonical form of an answer, for majority voting: the option it names, yes or no, the
    number in its base unit, or the normalized text; None for an answer that gives none of these."""
    if answer is None:
        return None
    answer = _LEAD_IN.sub("", answer.strip())
    kind = answer_kind(reference, choices)
    if kind == "choice":
        index = named_option(answer, choices or [])
        return None if index is None else f"option {index}"
    if kind == "yes_no":
        words = normalize(answer).split()
        if not words or words[0] not in YES | NO:
            return None
        return "yes" if words[0] in YES else "no"
    if kind == "number":
        got = parse_number(answer)
        return None if got is None else f"{got.base:.6g} {got.dimension or ''}".strip()
    return normalize(answer) or None
