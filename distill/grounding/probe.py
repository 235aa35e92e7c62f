"""Text-solvability: is an item answered right without its audio?

A few answers are sampled per item with the real audio and with each counterfactual; an item
whose counterfactual answers are right well above chance is answerable from the question alone
(a leaked answer, a prior the question gives away) and teaches nothing about listening. An item
with a closed answer set answers with one of its options (grounding.probe_answers=options): the
question is which option the model prefers without the audio, also for a model that does not
yet answer in the expected format.
"""

from __future__ import annotations

from dataclasses import dataclass, field

YES_NO = frozenset({"yes", "no"})


def answer_options(reference: str, choices: list[str] | None) -> tuple[str, ...] | None:
    """The closed set of answers an item takes: its choices, or yes and no for a yes/no
    reference; None for an open answer (a number, free text)."""
    if choices:
        return tuple(choices)
    return ("yes", "no") if reference.strip().lower() in YES_NO else None


def chance(reference: str, choices: list[str] | None) -> float:
    """The accuracy of guessing: 1/options for multiple choice, 1/2 for a yes/no question, else 0."""
    options = answer_options(reference, choices)
    return 1.0 / len(options) if options else 0.0


@dataclass
class ProbeTally:
    """Correct answers / answers per input ("real" or a counterfactual kind) for one item."""

    counts: dict[str, list[int]] = field(default_factory=dict)

    def add(self, kind: str, correct: int, total: int = 1) -> None:
        """Count `total` answers of which `correct` were right (one answer by default)."""
        c = self.counts.setdefault(kind, [0, 0])
        c[0] += correct
        c[1] += total

    def accuracy(self, kind: str) -> float | None:
        correct, total = self.counts.get(kind, (0, 0))
        return correct / total if total else None

    def counterfactual_accuracy(self) -> float | None:
        """Accuracy over every counterfactual answer together."""
        correct = sum(c for k, (c, _) in self.counts.items() if k != "real")
        total = sum(n for k, (_, n) in self.counts.items() if k != "real")
        return correct / total if total else None


def text_solvable(tally: ProbeTally, chance_rate: float, margin: float) -> bool:
    """Answered right without the real audio at a rate of at least chance + margin."""
    acc = tally.counterfactual_accuracy()
    return acc is not None and acc >= min(1.0, chance_rate + margin)
