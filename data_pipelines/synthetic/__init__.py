"""Synthetic acoustic tasks whose answer depends on the sound, not on any words.

A family is a pure function `(rng, difficulty, sample_rate) -> Example`. Items are deterministic
by (seed, split, index): the same config always yields the same audio, question and answer, and
the train and eval splits never share a random stream.
"""

from __future__ import annotations

import zlib
from collections.abc import Callable
from pathlib import Path

import numpy as np

from data_pipelines.audio import write_wav
from data_pipelines.items import Item
from data_pipelines.synthetic.tones import Example, higher_of_two, pitch_level

Family = Callable[[np.random.Generator, int, int], Example]

FAMILIES: dict[str, Family] = {
    "pitch_level": pitch_level,
    "higher_of_two": higher_of_two,
}
SPLITS = {"train": 1, "eval": 2, "cold_start": 3}


def make_example(family: str, split: str, index: int, seed: int, difficulty: int, sample_rate: int) -> Example:
    """The `index`-th example of `family` in `split`; a pure function of its arguments."""
    family_code = zlib.crc32(family.encode())  # stable when families are added
    rng = np.random.default_rng([seed, SPLITS[split], family_code, index])
    return FAMILIES[family](rng, difficulty, sample_rate)


def generate_split(
    out_dir: str | Path,
    split: str,
    families: list[str],
    n: int,
    seed: int,
    difficulty: int,
    sample_rate: int,
) -> list[Item]:
    """Write `n` items (families in turn) as WAV files under `out_dir/audio/` and return them."""
    out_dir = Path(out_dir)
    items = []
    for i in range(n):
        family = families[i % len(families)]
        ex = make_example(family, split, i // len(families), seed, difficulty, sample_rate)
        item_id = f"{family}-{split}-{i:05d}"
        wav = out_dir / "audio" / f"{item_id}.wav"
        if not wav.exists():
            write_wav(wav, ex.audio, sample_rate)
        items.append(
            Item(
                id=item_id, audio=str(wav.resolve()), question=ex.question, answer=ex.answer,
                choices=ex.choices, category="sound", family=family, difficulty=difficulty,
                reasoning=ex.reasoning,
            )
        )
    return items


def corpus(n_per_family: int = 200, seed: int = 0) -> list[str]:
    """Question and trace texts of every family, to train a tiny model's tokenizer on."""
    texts = []
    for family in sorted(FAMILIES):
        for i in range(n_per_family):
            ex = make_example(family, "train", i, seed, 1 + i % 3, 8000)
            texts += [ex.question, ex.reasoning]
    return texts
