"""Texture task families: a steady tone (one spectral line) versus noise (energy spread over a band)."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from data_pipelines.synthetic.example import Example, for_difficulty, rounded_hz, think
from data_pipelines.synthetic.signals import band_noise, fade, finish, sine, two_in_a_row


@dataclass(frozen=True)
class OrderLevel:
    """How hard `event_order` is at one difficulty."""

    event_s: tuple[float, float]  # duration of each of the two events
    noise_octaves: float | None  # the noise burst's bandwidth around the tone's pitch; None: full band
    tone_snr_db: float | None  # the tone event carries noise at this SNR; None: a clean tone


EVENT_ORDER_LEVELS = {
    1: OrderLevel(event_s=(0.35, 0.5), noise_octaves=None, tone_snr_db=None),
    2: OrderLevel(event_s=(0.18, 0.28), noise_octaves=2.0, tone_snr_db=12.0),
    3: OrderLevel(event_s=(0.08, 0.14), noise_octaves=1.0, tone_snr_db=6.0),
}
# Tone-to-noise power ratio (dB, noise over its whole band) of `noise_or_tone`, per difficulty.
NOISE_OR_TONE_SNR_DB = {1: (0.0, 6.0), 2: (-8.0, -3.0), 3: (-14.0, -10.0)}


def _mix_tone(tone: np.ndarray, noise: np.ndarray, snr_db: float) -> np.ndarray:
    """`tone` plus `noise` scaled to `snr_db` below it."""
    gain = np.sqrt(np.mean(tone**2) / np.mean(noise**2)) * 10 ** (-snr_db / 20)
    return tone + gain * noise


def _rms_to(wave: np.ndarray, rms: float) -> np.ndarray:
    return wave * (rms / np.sqrt(np.mean(wave**2)))


def event_order(rng: np.random.Generator, difficulty: int, sample_rate: int) -> Example:
    """A tone and a noise burst in sequence: which came first?"""
    level = for_difficulty(difficulty, EVENT_ORDER_LEVELS)
    tone_first = bool(rng.integers(2))
    freq = rng.uniform(400, 1500)
    rms = rng.uniform(0.05, 0.15)  # both events at the same random level: loudness is no cue
    tone_s, noise_s = rng.uniform(*level.event_s), rng.uniform(*level.event_s)
    if level.noise_octaves is None:
        low, high = 50.0, sample_rate / 2
    else:  # noise in the tone's own region: the spectra differ less, the listening is finer
        low, high = freq * 2 ** (-level.noise_octaves / 2), freq * 2 ** (level.noise_octaves / 2)
    tone = sine(freq, tone_s, sample_rate, 1.0, rng.uniform(0, 2 * np.pi))
    if level.tone_snr_db is not None:
        noisy = _mix_tone(tone, band_noise(rng, tone_s, sample_rate, low, high, 1.0), level.tone_snr_db)
        tone = fade(noisy, sample_rate)
    noise = fade(band_noise(rng, noise_s, sample_rate, low, high, 1.0), sample_rate)
    events = [_rms_to(tone, rms), _rms_to(noise, rms)]
    if not tone_first:
        events.reverse()
    parts = two_in_a_row(rng, events[0], events[1], sample_rate, edge=(0.1, 0.2), gap=(0.05, 0.15))
    tone_text = f"one sharp spectral peak near {rounded_hz(freq)} Hz, a steady tone"
    noise_text = "energy spread over a band of frequencies, a noise burst"
    first, second = (tone_text, noise_text) if tone_first else (noise_text, tone_text)
    answer = "tone" if tone_first else "noise"
    evidence = f"The first sound has {first}; the second has {second}. So the {answer} came first."
    return Example(
        audio=finish(parts, rng, 0.002),
        question="Listen to the two sounds. Which came first, the tone or the noise? Answer tone or noise.",
        free_question="Listen to the two sounds. Which came first, the tone or the noise?",
        choices=["tone", "noise"],
        answer=answer,
        reasoning=think(evidence, answer),
    )


def noise_or_tone(rng: np.random.Generator, difficulty: int, sample_rate: int) -> Example:
    """One sound: a steady tone in noise, or noise alone?"""
    has_tone = bool(rng.integers(2))
    seconds = rng.uniform(0.8, 1.5)
    # The noise band varies per item so its colour is no cue; it stays under 4 kHz at any sample rate.
    low, high = rng.uniform(50, 300), min(rng.uniform(2500, 4000), 0.45 * sample_rate)
    freq = rng.uniform(300, 1500)
    snr_db = rng.uniform(*for_difficulty(difficulty, NOISE_OR_TONE_SNR_DB))
    sound = band_noise(rng, seconds, sample_rate, low, high, 1.0)
    if has_tone:
        # A noise power of 1 and a sine's power of a^2 / 2 give the SNR.
        sound += sine(freq, seconds, sample_rate, np.sqrt(2) * 10 ** (snr_db / 20), rng.uniform(0, 2 * np.pi))
    sound = fade(_rms_to(sound, rng.uniform(0.04, 0.15)), sample_rate, 0.02)  # random level, no clipping
    answer = "tone" if has_tone else "noise"
    band = f"a broad noise band from about {rounded_hz(low)} to {rounded_hz(high)} Hz"
    if has_tone:
        evidence = (
            f"Over {band}, a narrow spectral line holds steady near {rounded_hz(freq)} Hz. "
            "So there is a tone."
        )
    else:
        evidence = f"The energy is spread over {band}, with no steady spectral line. So it is only noise."
    return Example(
        audio=finish([sound], rng, 0.001),
        question="Is there a steady tone in this sound, or only noise? Answer tone or noise.",
        free_question="Is there a steady tone in this sound, or only noise?",
        choices=["tone", "noise"],
        answer=answer,
        reasoning=think(evidence, answer),
    )
