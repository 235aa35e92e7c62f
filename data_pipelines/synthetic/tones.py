"""Pitch task families built from sine tones (numpy only)."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

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


@dataclass
class Example:
    audio: np.ndarray
    question: str
    choices: list[str]
    answer: str
    reasoning: str


def tone(rng: np.random.Generator, freq: float, seconds: float, sample_rate: int) -> np.ndarray:
    """A sine tone with random amplitude and phase, 10 ms fades, and faint noise."""
    t = np.arange(int(seconds * sample_rate)) / sample_rate
    wave = rng.uniform(0.3, 0.8) * np.sin(2 * np.pi * freq * t + rng.uniform(0, 2 * np.pi))
    fade = min(len(t) // 2, int(0.01 * sample_rate))
    ramp = np.linspace(0.0, 1.0, fade)
    wave[:fade] *= ramp
    wave[len(wave) - fade :] *= ramp[::-1]
    return (wave + rng.normal(0, 0.01, len(t))).astype(np.float32)


def _hz(freq: float) -> int:
    """Frequencies in traces are rounded to 10 Hz: precise enough to reason with, few tokens."""
    return int(round(freq / 10.0) * 10)


def _level(difficulty: int, table: dict) -> object:
    return table[min(max(difficulty, 1), max(table))]


def pitch_level(rng: np.random.Generator, difficulty: int, sample_rate: int) -> Example:
    """One tone: is its pitch high or low (above or below 500 Hz)?"""
    (lo_min, lo_max), (hi_min, hi_max) = _level(difficulty, PITCH_LEVEL_RANGES)  # type: ignore[misc]
    high = bool(rng.integers(2))
    freq = rng.uniform(hi_min, hi_max) if high else rng.uniform(lo_min, lo_max)
    seconds = rng.uniform(0.6, 1.0)
    answer = "high" if high else "low"
    side = "above" if high else "below"
    reasoning = (
        f"<think>\nThe tone holds a steady pitch near {_hz(freq)} Hz. "
        f"That is {side} the {PITCH_BOUNDARY_HZ} Hz midpoint, so the pitch is {answer}.\n</think>\n{answer}"
    )
    return Example(
        audio=tone(rng, freq, seconds, sample_rate),
        question="Listen to the tone. Is its pitch high or low? Answer high or low.",
        choices=["high", "low"],
        answer=answer,
        reasoning=reasoning,
    )


def higher_of_two(rng: np.random.Generator, difficulty: int, sample_rate: int) -> Example:
    """Two tones in a row: which one is higher in pitch?"""
    ratio = _level(difficulty, HIGHER_OF_TWO_RATIO)
    low = rng.uniform(150, 1200 / ratio)  # type: ignore[operator]
    high = rng.uniform(low * ratio, 1200)  # type: ignore[operator]
    first_higher = bool(rng.integers(2))
    f1, f2 = (high, low) if first_higher else (low, high)
    gap = np.zeros(int(0.2 * sample_rate), dtype=np.float32)
    audio = np.concatenate([tone(rng, f1, 0.4, sample_rate), gap, tone(rng, f2, 0.4, sample_rate)])
    answer = "first" if first_higher else "second"
    reasoning = (
        f"<think>\nThe first tone is near {_hz(f1)} Hz and the second near {_hz(f2)} Hz. "
        f"The {answer} tone has the higher frequency.\n</think>\n{answer}"
    )
    return Example(
        audio=audio,
        question="Listen to the two tones. Which one is higher in pitch? Answer first or second.",
        choices=["first", "second"],
        answer=answer,
        reasoning=reasoning,
    )
