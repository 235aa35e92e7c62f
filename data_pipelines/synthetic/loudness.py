"""Loudness task family: which of two tones is louder."""

from __future__ import annotations

import numpy as np

from data_pipelines.synthetic.example import Example, for_difficulty, think
from data_pipelines.synthetic.signals import db_to_gain, finish, sine, two_in_a_row

# Level difference (dB) between the two tones of `louder_of_two`, per difficulty.
LOUDER_OF_TWO_DB = {1: (10.0, 14.0), 2: (5.0, 7.0), 3: (2.5, 3.5)}


def _dbfs(amplitude: float) -> int:
    """RMS level of a sine of peak `amplitude`, in dB relative to full scale, rounded."""
    return round(20 * np.log10(amplitude / np.sqrt(2)))


def louder_of_two(rng: np.random.Generator, difficulty: int, sample_rate: int) -> Example:
    """Two tones of random pitch at different levels: which one is louder?"""
    diff_db = rng.uniform(*for_difficulty(difficulty, LOUDER_OF_TWO_DB))
    loud = rng.uniform(0.15, 0.9)  # the overall level is random: only the difference answers
    quiet = loud / db_to_gain(diff_db)
    first_louder = bool(rng.integers(2))
    a1, a2 = (loud, quiet) if first_louder else (quiet, loud)
    seconds = rng.uniform(0.4, 0.6)  # both tones last the same: duration is no cue
    # 500-1500 Hz, where equal-loudness contours are nearly flat: pitch does not change loudness.
    tones = [
        sine(rng.uniform(500, 1500), seconds, sample_rate, a, rng.uniform(0, 2 * np.pi)) for a in (a1, a2)
    ]
    parts = two_in_a_row(rng, tones[0], tones[1], sample_rate, edge=(0.05, 0.15), gap=(0.2, 0.3))
    answer = "first" if first_louder else "second"
    l1, l2 = _dbfs(a1), _dbfs(a2)
    evidence = (
        f"The first tone's level is near {l1} dBFS and the second's near {l2} dBFS, "
        f"so the {answer} tone is about {abs(l1 - l2)} dB louder."
    )
    return Example(
        audio=finish(parts, rng, 0.002),
        question="Listen to the two tones. Which one is louder? Answer first or second.",
        free_question="Listen to the two tones. Which one is louder, the first or the second?",
        choices=["first", "second"],
        answer=answer,
        reasoning=think(evidence, answer),
    )
