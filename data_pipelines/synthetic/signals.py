"""Signal building blocks for the synthetic families (numpy only, float64 until the end)."""

from __future__ import annotations

import numpy as np

FADE_SECONDS = 0.01  # short ramps: no clicks at a sound's edges, which would be an extra cue


def fade(wave: np.ndarray, sample_rate: int, seconds: float = FADE_SECONDS) -> np.ndarray:
    """Linear fade-in and fade-out, in place; returns `wave`."""
    n = min(len(wave) // 2, int(seconds * sample_rate))
    ramp = np.linspace(0.0, 1.0, n)
    wave[:n] *= ramp
    wave[len(wave) - n :] *= ramp[::-1]
    return wave


def sine(freq: float, seconds: float, sample_rate: int, amplitude: float, phase: float = 0.0) -> np.ndarray:
    """A faded sine of peak `amplitude`."""
    t = np.arange(int(seconds * sample_rate)) / sample_rate
    return fade(amplitude * np.sin(2 * np.pi * freq * t + phase), sample_rate)


def tone(rng: np.random.Generator, freq: float, seconds: float, sample_rate: int) -> np.ndarray:
    """A sine tone with random amplitude and phase, 10 ms fades, and faint noise."""
    amplitude = rng.uniform(0.3, 0.8)  # drawn before the phase: existing items must not change
    wave = sine(freq, seconds, sample_rate, amplitude, rng.uniform(0, 2 * np.pi))
    return (wave + rng.normal(0, 0.01, len(wave))).astype(np.float32)


def silence(seconds: float, sample_rate: int) -> np.ndarray:
    """Zeros lasting `seconds`."""
    return np.zeros(int(seconds * sample_rate))


def two_in_a_row(
    rng: np.random.Generator,
    first: np.ndarray,
    second: np.ndarray,
    sample_rate: int,
    edge: tuple[float, float],
    gap: tuple[float, float],
) -> list[np.ndarray]:
    """Two sounds with random silences before (`edge`), between (`gap`) and after (`edge`) them,
    drawn in that order."""
    lead = silence(rng.uniform(*edge), sample_rate)
    middle = silence(rng.uniform(*gap), sample_rate)
    return [lead, first, middle, second, silence(rng.uniform(*edge), sample_rate)]


def band_noise(
    rng: np.random.Generator, seconds: float, sample_rate: int, low_hz: float, high_hz: float, rms: float
) -> np.ndarray:
    """Gaussian noise with its spectrum cut to [low_hz, high_hz] (kept under Nyquist), scaled to `rms`."""
    n = int(seconds * sample_rate)
    n_fft = 1 << max(n - 1, 1).bit_length()  # a power of two: FFTs of odd lengths can be very slow
    spectrum = np.fft.rfft(rng.normal(0, 1, n_fft))
    freqs = np.fft.rfftfreq(n_fft, 1 / sample_rate)
    spectrum[(freqs < low_hz) | (freqs > min(high_hz, 0.45 * sample_rate))] = 0
    noise = np.fft.irfft(spectrum, n_fft)[:n]
    return noise * (rms / max(float(np.sqrt(np.mean(noise**2))), 1e-12))


def click(freq: float, decay_s: float, sample_rate: int, amplitude: float) -> np.ndarray:
    """A 40 ms percussive click: a sine at `freq` decaying with time constant `decay_s`."""
    t = np.arange(int(0.04 * sample_rate)) / sample_rate
    wave = amplitude * np.exp(-t / decay_s) * np.sin(2 * np.pi * freq * t)
    return fade(wave, sample_rate, 0.002)


def db_to_gain(db: float) -> float:
    """Amplitude ratio of a level difference in dB."""
    return float(10 ** (db / 20))


def finish(parts: list[np.ndarray], rng: np.random.Generator, noise_std: float) -> np.ndarray:
    """Join `parts`, add a faint noise floor (no digital silence anywhere), and return float32."""
    audio = np.concatenate(parts)
    return (audio + rng.normal(0, noise_std, len(audio))).astype(np.float32)
