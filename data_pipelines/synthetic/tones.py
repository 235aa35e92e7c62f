"""Pitch task families built from sine tones (numpy only)."""

from __future__ import annotations

import numpy as np

# Example and tone lived in this module first; they stay importable from here.
from data_pipelines.synthetic.example import Example, for_difficulty, rounded_hz, think
from data_pipelines.synthetic.signals import tone

# Pitch boundary of `pitch_level`, and the (low, high) frequency ranges per difficulty:
# the closer the ranges come to the boundary, the finer the listening must be.
PITCH_BOUNDARY_HZ = 500
PITCH_LEVEL_RANGES = {
    1: ((150, 300), (800, 1200)),
    2: ((250, 400), (620, 900)),
    3: ((350, 460), (540, 700)),
}
# Minimum frequency ratio between the two tones of `higher_of_two`, per difficulty.
HIGHER_OF_TWO_RATIO = {1: 2.0, 2: 1.4, 3: 1.15}


def pitch_level(rng: np.random.Generator, difficulty: int, sample_rate: int) -> Example:
    """One tone: is its pitch high or low (above or below 500 Hz)?"""
    (lo_min, lo_max), (hi_min, hi_max) = for_difficulty(difficulty, PITCH_LEVEL_RANGES)
    high = bool(rng.integers(2))
    freq = rng.uniform(hi_min, hi_max) if high else rng.uniform(lo_min, lo_max)
    seconds = rng.uniform(0.6, 1.0)
    answer = "high" if high else "low"
    side = "above" if high else "below"
    evidence = (
        f"The tone holds a steady pitch near {rounded_hz(freq)} Hz. "
        f"That is {side} the {PITCH_BOUNDARY_HZ} Hz midpoint, so the pitch is {answer}."
    )
    return Example(
        audio=tone(rng, freq, seconds, sample_rate),
        question="Listen to the tone. Is its pitch high or low? Answer high or low.",
        free_question="Listen to the tone. Is its pitch high or low?",
        choices=["high", "low"],
        answer=answer,
        reasoning=think(evidence, answer),
    )


def higher_of_two(rng: np.random.Generator, difficulty: int, sample_rate: int) -> Example:
    """Two tones in a row: which one is higher in pitch?"""
    ratio = for_difficulty(difficulty, HIGHER_OF_TWO_RATIO)
    low = rng.uniform(150, 1200 / ratio)
    high = rng.uniform(low * ratio, 1200)
    first_higher = bool(rng.integers(2))
    f1, f2 = (high, low) if first_higher else (low, high)
    gap = np.zeros(int(0.2 * sample_rate), dtype=np.float32)
    audio = np.concatenate([tone(rng, f1, 0.4, sample_rate), gap, tone(rng, f2, 0.4, sample_rate)])
    answer = "first" if first_higher else "second"
    evidence = (
        f"The first tone is near {rounded_hz(f1)} Hz and the second near {rounded_hz(f2)} Hz. "
        f"The {answer} tone has the higher frequency."
    )
    return Example(
        audio=audio,
        question="Listen to the two tones. Which one is higher in pitch? Answer first or second.",
        free_question="Listen to the two tones. Which one is higher in pitch, the first or the second?",
        choices=["first", "second"],
        answer=answer,
        reasoning=think(evidence, answer),
    )
