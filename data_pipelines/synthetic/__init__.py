"""Synthetic acoustic tasks whose answer depends on the sound, not on any words.

A family is a pure function `(rng, difficulty, sample_rate) -> Example`. Items are deterministic
by (seed, split, index): the same config always yields the same audio, question and answer, and
the train and eval splits never share a random stream. Difficulty 1-3: harder is finer listening.
"""

from __future__ import annotations

import zlib
from collections.abc import Callable
from pathlib import Path

import numpy as np

from data_pipelines.audio import write_wav
from data_pipelines.items import Item
from data_pipelines.synthetic.example import Example
from data_pipelines.synthetic.loudness import louder_of_two
from data_pipelines.synthetic.speech import (
    SynthesizerMissingError,
    espeak_available,
    spoken_pitch_conflict,
    spoken_pitch_texts,
)
from data_pipelines.synthetic.texture import event_order, noise_or_tone
from data_pipelines.synthetic.timing import count_events, longer_of_two, tempo
from data_pipelines.synthetic.tones import higher_of_two, pitch_level

__all__ = [
    "ANSWER_FORMATS",
    "FAMILIES",
    "SPLITS",
    "Example",
    "SynthesizerMissingError",
    "corpus",
    "family_available",
    "generate_split",
    "make_example",
]

Family = Callable[[np.random.Generator, int, int], Example]

FAMILIES: dict[str, Family] = {
    "pitch_level": pitch_level,
    "higher_of_two": higher_of_two,
    "count_events": count_events,
    "louder_of_two": louder_of_two,
    "longer_of_two": longer_of_two,
    "tempo": tempo,
    "event_order": event_order,
    "noise_or_tone": noise_or_tone,
    "spoken_pitch_conflict": spoken_pitch_conflict,
}
SPLITS = {"train": 1, "eval": 2, "cold_start": 3}
# Multiple choice (the question lists its options), a free answer, or a mix of the two.
ANSWER_FORMATS = ("choice", "free", "mixed")
# Families that need an outside program, and how to tell whether it is there.
_REQUIREMENTS: dict[str, Callable[[], bool]] = {"spoken_pitch_conflict": espeak_available}
# Families whose texts can be drawn without their program (so `corpus` never needs it).
_TEXTS_ONLY: dict[str, Callable[[np.random.Generator, int], list[str]]] = {
    "spoken_pitch_conflict": spoken_pitch_texts,
}


def family_available(name: str) -> bool:
    """Whether `name` is a known family whose items can be generated on this machine."""
    return name in FAMILIES and _REQUIREMENTS.get(name, lambda: True)()


def _rng(family: str, split: str, index: int, seed: int) -> np.random.Generator:
    family_code = zlib.crc32(family.encode())  # stable when families are added
    return np.random.default_rng([seed, SPLITS[split], family_code, index])


def make_example(
    family: str, split: str, index: int, seed: int, difficulty: int, sample_rate: int
) -> Example:
    """The `index`-th example of `family` in `split`; a pure function of its arguments."""
    return FAMILIES[family](_rng(family, split, index, seed), difficulty, sample_rate)


def generate_split(
    out_dir: str | Path,
    split: str,
    families: list[str],
    n: int,
    seed: int,
    difficulty: int,
    sample_rate: int,
    answer_format: str = "choice",
) -> list[Item]:
    """Write `n` items (families in turn) as WAV files under `out_dir/audio/` and return them.

    `answer_format` (one of ANSWER_FORMATS) picks multiple choice (question with its options, and
    `choices`), free form (`free_question`, choices None), or both alternating.
    """
    if answer_format not in ANSWER_FORMATS:
        raise ValueError(f"answer_format {answer_format!r} is not one of {ANSWER_FORMATS}")
    out_dir = Path(out_dir)
    items = []
    for i in range(n):
        family = families[i % len(families)]
        index = i // len(families)
        ex = make_example(family, split, index, seed, difficulty, sample_rate)
        item_id = f"{family}-{split}-{i:05d}"
        wav = out_dir / "audio" / f"{item_id}.wav"
        if not wav.exists():
            write_wav(wav, ex.audio, sample_rate)
        # Alternating on the family's own index: every family gets both formats in a mixed split.
        free = answer_format == "free" or (answer_format == "mixed" and index % 2 == 1)
        items.append(
            Item(
                id=item_id,
                audio=str(wav.resolve()),
                question=ex.free_question if free else ex.question,
                answer=ex.answer,
                choices=None if free else ex.choices,
                category=ex.category,
                family=family,
                difficulty=difficulty,
                reasoning=ex.reasoning,
                transcript=ex.transcript,
            )
        )
    return items


def corpus(n_per_family: int = 200, seed: int = 0) -> list[str]:
    """Question and trace texts of every family, to train a tiny model's tokenizer on.

    It never runs an outside program (espeak-ng): the same texts on every machine.
    """
    texts = []
    for family in sorted(FAMILIES):
        for i in range(n_per_family):
            rng, difficulty = _rng(family, "train", i, seed), 1 + i % 3
            if family in _TEXTS_ONLY:
                texts += _TEXTS_ONLY[family](rng, difficulty)
            else:
                ex = FAMILIES[family](rng, difficulty, 8000)
                texts += [ex.question, ex.free_question, ex.reasoning]
    return texts
