"""Timing task families: how many events, which lasts longer, how fast they repeat."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from data_pipelines.synthetic.example import Example, for_difficulty, think
from data_pipelines.synthetic.signals import click, finish, silence, sine, two_in_a_row


@dataclass(frozen=True)
class CountLevel:
    """How hard `count_events` is at one difficulty."""

    beep_s: tuple[float, float]  # duration of each beep
    gap_s: tuple[float, float]  # silence between beeps
    amplitude: tuple[float, float]  # drawn per beep: a wide range makes some beeps faint
    semitones: float  # each beep's pitch varies this much around the sequence's base pitch
    noise_std: float  # background noise that fills the gaps


COUNT_EVENTS_BEEPS = (2, 6)  # inclusive range of the number of beeps
COUNT_EVENTS_CHOICES = range(1, 8)  # the four choices are drawn from these numbers
COUNT_EVENTS_LEVELS = {
    1: CountLevel(
        beep_s=(0.10, 0.14), gap_s=(0.22, 0.30), amplitude=(0.5, 0.6), semitones=0, noise_std=0.003
    ),
    2: CountLevel(
        beep_s=(0.07, 0.11), gap_s=(0.12, 0.18), amplitude=(0.3, 0.8), semitones=4, noise_std=0.015
    ),
    3: CountLevel(
        beep_s=(0.05, 0.08), gap_s=(0.06, 0.10), amplitude=(0.25, 0.8), semitones=12, noise_std=0.03
    ),
}
# Minimum duration ratio of the longer to the shorter tone of `longer_of_two`, per difficulty.
LONGER_OF_TWO_RATIO = {1: 2.0, 2: 1.5, 3: 1.2}
# Tempo boundary of `tempo`, and the (slow, fast) BPM ranges per difficulty, closing in on it.
TEMPO_BOUNDARY_BPM = 120
TEMPO_RANGES = {
    1: ((50, 80), (170, 220)),
    2: ((75, 100), (145, 180)),
    3: ((95, 112), (130, 150)),
}


def _or_list(options: list[str]) -> str:
    return f"{', '.join(options[:-1])} or {options[-1]}"


def count_events(rng: np.random.Generator, difficulty: int, sample_rate: int) -> Example:
    """A few short beeps: how many are there?"""
    level = for_difficulty(difficulty, COUNT_EVENTS_LEVELS)
    k = int(rng.integers(COUNT_EVENTS_BEEPS[0], COUNT_EVENTS_BEEPS[1] + 1))
    base_hz = rng.uniform(400, 1200)
    beeps = [rng.uniform(*level.beep_s) for _ in range(k)]
    gaps = [rng.uniform(*level.gap_s) for _ in range(k - 1)]
    lead, trail = rng.uniform(0.1, 0.3), rng.uniform(0.1, 0.3)
    parts = [silence(lead, sample_rate)]
    for seconds, after in zip(beeps, [*gaps, trail]):
        freq = base_hz * 2 ** (rng.uniform(-level.semitones, level.semitones) / 12)
        parts.append(
            sine(freq, seconds, sample_rate, rng.uniform(*level.amplitude), rng.uniform(0, 2 * np.pi))
        )
        parts.append(silence(after, sample_rate))
    others = rng.choice([c for c in COUNT_EVENTS_CHOICES if c != k], size=3, replace=False)
    choices = [str(c) for c in sorted([k, *others.tolist()])]
    answer = str(k)
    evidence = (
        f"The energy envelope rises {k} times: {k} onsets of short beeps about {np.mean(beeps):.2f} s long, "
        f"with gaps of about {np.mean(gaps):.2f} s. So there are {k} beeps."
    )
    return Example(
        audio=finish(parts, rng, level.noise_std),
        question=f"How many beeps do you hear? Answer {_or_list(choices)}.",
        free_question="How many beeps do you hear? Answer with a number.",
        choices=choices,
        answer=answer,
        reasoning=think(evidence, answer),
    )


def longer_of_two(rng: np.random.Generator, difficulty: int, sample_rate: int) -> Example:
    """Two tones in a row, of random pitch and level: which one lasts longer?"""
    ratio = for_difficulty(difficulty, LONGER_OF_TWO_RATIO)
    short = rng.uniform(0.2, 0.5)
    long = short * ratio * rng.uniform(1.0, 1.15)
    first_longer = bool(rng.integers(2))
    d1, d2 = (long, short) if first_longer else (short, long)
    # Pitch and level are drawn per tone, independently of which is longer: neither is a cue.
    tones = [sine(rng.uniform(300, 1200), d, sample_rate, rng.uniform(0.3, 0.8)) for d in (d1, d2)]
    parts = two_in_a_row(rng, tones[0], tones[1], sample_rate, edge=(0.05, 0.15), gap=(0.2, 0.35))
    answer = "first" if first_longer else "second"
    evidence = (
        f"The first tone lasts about {d1:.2f} s and the second about {d2:.2f} s, "
        f"so the {answer} tone is longer."
    )
    return Example(
        audio=finish(parts, rng, 0.003),
        question="Listen to the two tones. Which one lasts longer? Answer first or second.",
        free_question="Listen to the two tones. Which one lasts longer, the first or the second?",
        choices=["first", "second"],
        answer=answer,
        reasoning=think(evidence, answer),
    )


def tempo(rng: np.random.Generator, difficulty: int, sample_rate: int) -> Example:
    """A steady click train: is the tempo fast or slow (above or below 120 BPM)?"""
    (slow_min, slow_max), (fast_min, fast_max) = for_difficulty(difficulty, TEMPO_RANGES)
    fast = bool(rng.integers(2))
    bpm = rng.uniform(fast_min, fast_max) if fast else rng.uniform(slow_min, slow_max)
    interval = 60.0 / bpm
    lead = rng.uniform(0.1, 0.25)
    n_clicks = int((2.7 - lead) / interval) + 1  # as many as fit in 2.7 s: 3 even at 50 BPM
    # One timbre and level per train, random across items: only the spacing tells the tempo.
    one = click(
        rng.uniform(800, min(3000, 0.4 * sample_rate)),
        rng.uniform(0.003, 0.01),
        sample_rate,
        rng.uniform(0.3, 0.9),
    )
    audio = silence(lead + (n_clicks - 1) * interval + len(one) / sample_rate + 0.1, sample_rate)
    for i in range(n_clicks):
        start = int((lead + i * interval) * sample_rate)
        audio[start : start + len(one)] += one
    answer = "fast" if fast else "slow"
    side = "above" if fast else "below"
    evidence = (
        f"Clicks repeat every {interval:.2f} s, about {round(bpm)} beats per minute. "
        f"That is {side} the {TEMPO_BOUNDARY_BPM} BPM midpoint, so the tempo is {answer}."
    )
    return Example(
        audio=finish([audio], rng, 0.003),
        question="Listen to the clicks. Is the tempo fast or slow? Answer fast or slow.",
        free_question="Listen to the clicks. Is the tempo fast or slow?",
        choices=["fast", "slow"],
        answer=answer,
        reasoning=think(evidence, answer),
    )
