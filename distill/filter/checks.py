"""Reward checks: small pure functions of a trace (and its reference).

Each check returns None when the trace passes, or a short reason string ("family:detail") when it
fails; the reason is what the filter stage counts and writes next to every rejected trace. The
text checks work on a few plain string searches (C speed) rather than regexes over the whole
trace: the filter runs them on every sampled trace, thousands of tokens each
(bench/filter_checks.py). The trace is split into reasoning and answer once (split_trace), and
the checks take the pieces.
"""

from __future__ import annotations

import re
from functools import lru_cache

from distill.filter.answers import (
    EXACT,
    Tolerance,
    Verifier,
    answer_kind,
    answer_matches,
    named_option,
    number_mentions,
    numbers_match,
    option_patterns,
)
from distill.filter.config import SCRIPT_NAMES

# Unicode ranges per script. Latin includes ASCII, Latin-1/Extended, IPA and combining accents
# (speech tasks: "ə", "é"), general punctuation, the symbol blocks English reasoning uses (arrows,
# math operators: "≈ 440 Hz", "→"), the micro sign's Greek twin ("μs"), and emoji.
SCRIPTS: dict[str, str] = {
    "latin": "\u0000-\u036f\u03bc\u1e00-\u1eff\u2000-\u2bff\U0001f000-\U0001faff",
    "greek": "\u0370-\u03ff",
    "cyrillic": "\u0400-\u04ff",
    "arabic": "\u0600-\u06ff",
    "devanagari": "\u0900-\u097f",
    "cjk": (
        "\u2e80-\u2fdf\u3000-\u303f\u3040-\u30ff\u3100-\u312f"
        "\u3400-\u4dbf\u4e00-\u9fff\uf900-\ufaff\uff00-\uffef"
    ),
    "hangul": "\u1100-\u11ff\u3130-\u318f\uac00-\ud7af",
}
# A config's filter.allowed_scripts is checked against SCRIPT_NAMES (loading a config imports no filter code).
assert tuple(SCRIPTS) == SCRIPT_NAMES, "filter/config.py SCRIPT_NAMES must list the scripts of SCRIPTS"
_SCRIPT_RE = {name: re.compile(f"[{chars}]") for name, chars in SCRIPTS.items()}

# Self-cognition: the model claims it cannot hear or is a text model (the report's judge dropped
# these). The whole trace is scanned only for three anchor words, in lower case as they stand
# mid-sentence ("I cannot hear", "as a text model"); the pattern is tried on a short window around
# each (a regex over thousands of tokens would cost more than every other check together).
SELF_COGNITION_ANCHORS = (" hear", " listen", " model")
SELF_COGNITION = re.compile(
    r"\b(?:i|we)(?: really| actually)? (?:can ?not|can't|cannot|am unable to|am not able to|'m unable to|"
    r"'m not able to|don't|do not|have no (?:way|ability) to|lack the ability to|don't have the ability to|"
    r"do not have the ability to)(?: actually| directly| really)? (?:hear|listen)\b"
    r"|\bas an? (?:(?:text[- ]based|text|language|ai|large language|text-only) ){1,2}model\b"
    r"|\bwithout (?:being able to )?(?:hearing|listening to) "
    r"(?:the|this|any) (?:audio|clip|sound|recording)\b",
    re.IGNORECASE,
)
# Runs that count as runaway whitespace (long needles: a string search skips through text faster).
WHITESPACE_RUNS = (" " * 16, "\n" * 8)
TAB_RUN = "\t" * 8


def check_format(parts: tuple[str, str] | None, min_reasoning_chars: int = 1) -> str | None:
    """Exactly one think block, first, with non-empty reasoning and an answer after it. `parts` is
    split_trace(text) (the filter splits each trace once for all checks)."""
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


def check_length(reasoning_tokens: int | None, min_tokens: int, max_tokens: int) -> str | None:
    """Reasoning within [min_tokens, max_tokens] tokens (max_tokens 0: no cap)."""
    if reasoning_tokens is None:
        return None  # a trace without a think block fails the format check instead
    if reasoning_tokens < min_tokens:
        return "length:short"
    if max_tokens and reasoning_tokens > max_tokens:
        return "length:long"
    return None


def check_control_tokens(text: str, control_tokens: tuple[str, ...]) -> str | None:
    """Chat or audio control tokens (`<|im_start|>`, audio placeholders, ...) inside a trace: the model
    wandered out of its turn, and an audio placeholder in a target would break training."""
    return "control_tokens" if any(tok in text for tok in control_tokens) else None


def question_scripts(question: str) -> frozenset[str]:
    """The scripts a question is written in (Latin always counts: numbers and units are Latin)."""
    if question.isascii():
        return frozenset({"latin"})
    return frozenset({"latin", *(name for name, rx in _SCRIPT_RE.items() if rx.search(question))})


def disallowed_pattern(allowed: frozenset[str]) -> re.Pattern:
    """A regex matching any character outside the allowed scripts' ranges."""
    return re.compile(f"[^{''.join(SCRIPTS[s] for s in sorted(allowed))}]")


def check_language(text: str, disallowed: re.Pattern) -> str | None:
    """The trace stays in the allowed scripts (stray Chinese characters in English reasoning are a
    known failure of this model family). `disallowed` comes from disallowed_pattern."""
    if text.isascii():
        return None  # ASCII is Latin: the common case costs nothing (str.isascii is a flag lookup)
    # An English trace with a dash or a degree sign: only its non-ASCII stretches are searched.
    for start in range(0, len(text), 512):
        chunk = text[start : start + 512]
        if not chunk.isascii() and disallowed.search(chunk):
            return "language:script"
    return None


def check_degeneration(
    text: str, window: int = 40, max_repeats: int = 4, max_period: int = 400
) -> str | None:
    """Loops and runaway whitespace. A loop is a block of at most `max_period` characters repeated
    `max_repeats` times back to back; it is looked for at a few probe points (the middle, three
    quarters and nine tenths in) and at the end, where a stuck generation runs into max_tokens."""
    if any(run in text for run in WHITESPACE_RUNS) or ("\t" in text and TAB_RUN in text):
        return "degenerate:whitespace"
    n = len(text)
    if n < 2 * window:
        return None
    for p in (n // 2, (3 * n) // 4, (9 * n) // 10):
        probe = text[p : p + window]
        q = text.find(probe, p + 1, p + max_period + window)
        if q > 0 and text.startswith(text[p:q] * (max_repeats - 1), q):
            return "degenerate:loop"
    # And at the very end, where a loop cut off by max_tokens stops: the period is the distance
    # back to the previous occurrence of the last `window` characters.
    q = text.rfind(text[n - window :], max(0, n - window - max_period), n - 1)
    if q >= 0 and text.endswith(
        text[q + window - n :] * max_repeats
    ):  # the last (n - window - q) chars, repeated
        return "degenerate:loop"
    return None


def check_self_cognition(text: str) -> str | None:
    """Claims of not hearing the audio or of being a text model."""
    for anchor in SELF_COGNITION_ANCHORS:
        at = text.find(anchor)
        while at >= 0:
            if SELF_COGNITION.search(text, max(0, at - 60), at + 60):
                return "self_cognition"
            at = text.find(anchor, at + len(anchor))
    return None


def check_correct(
    answer: str | None,
    reference: str,
    choices: list[str] | None = None,
    *,
    tol: Tolerance = EXACT,
    verifier: Verifier | None = None,
    trace: dict | None = None,
) -> str | None:
    """The extracted answer (answer_of / extract_answer) matches the reference, by a custom
    verifier when one is given."""
    if answer is None:
        return "answer:missing"
    if verifier is not None:
        return None if verifier(answer, reference, trace or {}) else "answer:wrong"
    return None if answer_matches(answer, reference, choices, tol) else "answer:wrong"


def last_word(text: str, word: str) -> int:
    """Where `word` last occurs in `text` as a whole word, or -1 (string searches: a `\\b` regex
    tries every position and costs ten times more)."""
    at = text.rfind(word)
    while at >= 0:
        end = at + len(word)
        if (at == 0 or not text[at - 1].isalnum()) and (end == len(text) or not text[end].isalnum()):
            return at
        at = text.rfind(word, 0, end - 1)
    return -1


def check_agreement(
    reasoning: str | None,
    answer: str | None,
    choices: list[str] | None,
    reference: str,
    tol: Tolerance = EXACT,
    tail_chars: int = 240,
) -> str | None:
    """The reasoning's conclusion names the same answer as the answer line: the option mentioned
    last at the end of the reasoning (multiple choice), or one of the numbers there (numeric
    answers, units converted, within `tol`). Free text and conclusions that name nothing pass."""
    if reasoning is None or answer is None:
        return None  # the format and answer checks report these
    tail = reasoning[-tail_chars:].lower()
    kind = answer_kind(reference, choices)
    if kind == "choice":  # options are matched as whole words in the lowercased tail
        given = named_option(answer, choices or [])
        options, _ = option_patterns(tuple(choices or []))
        # The option that ends last wins, the longer one on a tie ("very low" over "low").
        last = max(
            (
                (at + len(o), len(o), i)
                for i, o in enumerate(options)
                if o and (at := last_word(tail, o)) >= 0
            ),
            default=None,
        )
        return None if last is None or given is None or last[2] == given else "format:disagree"
    if kind == "number":
        said = number_mentions(tail)
        return None if not said or any(numbers_match(x, answer, tol) for x in said) else "format:disagree"
    return None


# Characters of a trace's reasoning searched for acoustic terms first (check_acoustic_terms): a
# passing trace is then lower-cased and searched 1 KB deep rather than whole.
ACOUSTIC_HEAD_CHARS = 1024


def acoustic_terms(reasoning: str, terms: tuple[str, ...], enough: int = 0) -> list[str]:
    """The distinct `terms` (lower-case substrings) the reasoning cites, in the order of `terms`;
    with `enough`, stops once that many are found (the check needs no more)."""
    text = reasoning.lower()
    found = []
    for term in terms:
        if term in text:
            found.append(term)
            if len(found) == enough:
                break
    return found


@lru_cache(maxsize=16)
def ascii_terms(terms: tuple[str, ...]) -> tuple[str, ...]:
    """The terms an ASCII text can hold (a trace that cites none is searched for every term, and a
    third of the default terms are Chinese)."""
    return tuple(t for t in terms if t.isascii())


def check_acoustic_terms(
    reasoning: str | None, acoustic: tuple[str, ...], transcript: tuple[str, ...], min_terms: int = 1
) -> str | None:
    """The reasoning cites at least `min_terms` distinct acoustic properties (pitch, Hz, loudness,
    duration, rhythm, ...). A cheap lexical signal, not proof of listening: the grounding stage
    measures that. A failing trace that talks about words instead is told apart in the reason."""
    if reasoning is None:
        return None  # the format check reports it
    # The opening usually names what is heard: enough terms there decide, as the whole would.
    head = reasoning[:ACOUSTIC_HEAD_CHARS]
    if len(acoustic_terms(head, acoustic, min_terms)) >= min_terms:
        return None
    if reasoning.isascii():  # a flag lookup; lower-cased ASCII text holds no other term
        acoustic, transcript = ascii_terms(acoustic), ascii_terms(transcript)
    if len(reasoning) > len(head) and len(acoustic_terms(reasoning, acoustic, min_terms)) >= min_terms:
        return None
    return (
        "lexical:transcript_only" if acoustic_terms(reasoning, transcript, 1) else "lexical:no_acoustic_terms"
    )


def check_audio_dependence(
    record: dict | None, min_dependence: float | None, min_answer_dependence: float | None
) -> str | None:
    """The trace is more likely with the real audio than with every counterfactual, by at least
    `min_dependence` nats per reasoning token and `min_answer_dependence` nats over the answer
    (None: that part unchecked). `record` is the ground stage's measurement of the trace; a trace
    without one (nothing to compare against) passes."""
    if record is None:
        return None
    dep, ans = record.get("dependence"), record.get("answer_dependence")
    if min_dependence is not None and dep is not None and dep < min_dependence:
        return "grounding:audio_independent"
    if min_answer_dependence is not None and ans is not None and ans < min_answer_dependence:
        return "grounding:answer_independent"
    return None
