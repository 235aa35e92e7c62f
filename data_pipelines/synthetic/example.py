"""What a task family returns, and the small text helpers every family shares."""

from __future__ import annotations

from dataclasses import dataclass
from typing import TypeVar

import numpy as np

T = TypeVar("T")


@dataclass
class Example:
    """One synthetic item: the sound, the question asked both ways, the answer and a reference trace.

    `question` lists the options and goes with `choices` (multiple choice); `free_question` asks the
    same without a choice list. `transcript` is what is said in the audio, if anything: for the speech
    families it is the misleading word, never the answer.
    """

    audio: np.ndarray
    question: str
    choices: list[str]
    answer: str
    reasoning: str
    free_question: str
    category: str = "sound"
    transcript: str | None = None


def for_difficulty(difficulty: int, table: dict[int, T]) -> T:
    """The table's entry for `difficulty`, clamped to the levels the table has."""
    return table[min(max(difficulty, 1), max(table))]


def rounded_hz(freq: float) -> int:
    """Frequencies in traces are rounded to 10 Hz: precise enough to reason with, few tokens."""
    return int(round(freq / 10.0) * 10)


def think(evidence: str, answer: str) -> str:
    """A cold-start trace: the acoustic evidence inside <think>, then the answer as the last line."""
    return f"<think>\n{evidence}\n</think>\n{answer}"
