"""Speech task family: a voice's pitch against the word it says (needs the espeak-ng synthesizer).

The word ("high" or "low") contradicts the voice in about half the items, so the transcript is a
trap: the answer comes from the voice's fundamental frequency only.
"""

from __future__ import annotations

import functools
import shutil
import subprocess
import tempfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import soundfile as sf
import soxr

from data_pipelines.synthetic.example import Example, for_difficulty, rounded_hz, think
from data_pipelines.synthetic.signals import finish, silence

ESPEAK = "espeak-ng"
# A female variant: its f0 follows `-p` cleanly over about 125-300 Hz, where the default male
# voice turns creaky (few voiced frames) below about 80 Hz.
ESPEAK_VOICE = "en+f2"
SPEECH_BOUNDARY_HZ = 175  # between tens: a trace's f0, rounded to 10 Hz, never equals it
# espeak-ng `-p` settings (0-99) of the (low, high) voices per difficulty, closing in on the boundary.
SPOKEN_PITCH_SETTINGS = {
    1: ((0, 20), (80, 99)),
    2: ((15, 32), (68, 85)),
    3: ((28, 40), (58, 70)),
}
# Median f0 (Hz) measured for ESPEAK_VOICE per `-p` setting (espeak-ng 1.51, both words, 140-200 wpm;
# spread about +-10 Hz). Only for texts drawn without synthesizing (`spoken_pitch_texts`): a real
# item's trace cites its own measured f0.
_F0_AT_PITCH = (
    (0, 124),
    (10, 133),
    (20, 142),
    (30, 153),
    (40, 163),
    (50, 178),
    (60, 197),
    (70, 219),
    (80, 244),
    (90, 275),
    (99, 306),
)
QUESTION = "Ignore what is said. Is the speaker's voice high or low in pitch? Answer high or low."
FREE_QUESTION = "Ignore what is said. Is the speaker's voice high or low in pitch?"


class SynthesizerMissingError(RuntimeError):
    """A speech family was asked for, but its synthesizer program is not installed."""


def espeak_available() -> bool:
    """Whether the espeak-ng program is on PATH."""
    return shutil.which(ESPEAK) is not None


def speak(text: str, pitch: int, speed: int, sample_rate: int) -> np.ndarray:
    """`text` spoken by espeak-ng at `pitch` (0-99) and `speed` (words per minute), mono float32.
    Synthesized once per process and voice: the CI saw two espeak-ng calls with the same
    arguments return audio that differed (rarely, cause unknown), which broke the rule that one
    seed gives one data set; the cache also spares repeated words their espeak-ng start."""
    program = shutil.which(ESPEAK)
    if program is None:
        raise SynthesizerMissingError(
            f"family 'spoken_pitch_conflict' needs {ESPEAK} (apt-get install espeak-ng); it is not on PATH"
        )
    return _speak(program, text, pitch, speed, sample_rate).copy()


@functools.lru_cache(maxsize=4096)
def _speak(program: str, text: str, pitch: int, speed: int, sample_rate: int) -> np.ndarray:
    with tempfile.TemporaryDirectory() as tmp:
        wav = Path(tmp) / "speech.wav"
        cmd = [program, "-v", ESPEAK_VOICE, "-p", str(pitch), "-s", str(speed), "-w", str(wav), text]
        proc = subprocess.run(cmd, check=False, capture_output=True, text=True)
        if proc.returncode != 0 or not wav.exists():
            raise RuntimeError(f"{ESPEAK} failed (exit {proc.returncode}): {proc.stderr.strip()}")
        data, rate = sf.read(str(wav), dtype="float32", always_2d=True)
    mono = data.mean(axis=1)
    return (soxr.resample(mono, rate, sample_rate) if rate != sample_rate else mono).astype(np.float32)


def median_f0(audio: np.ndarray, sample_rate: int, fmin: float = 80.0, fmax: float = 400.0) -> float:
    """Median fundamental frequency (Hz) of the voiced 40 ms frames, by normalized autocorrelation."""
    win, hop = int(0.04 * sample_rate), int(0.01 * sample_rate)
    lo, hi = int(sample_rate / fmax), int(sample_rate / fmin) + 1
    starts = range(0, len(audio) - win - hi, hop)
    frame_rms = [float(np.sqrt(np.mean(audio[s : s + win] ** 2))) for s in starts]
    loud = 0.2 * max(frame_rms, default=0.0)
    f0s = []
    for s, r in zip(starts, frame_rms):
        if r < loud:
            continue
        frame, seg = audio[s : s + win], audio[s : s + win + hi]
        energy = np.convolve(seg**2, np.ones(win), "valid")  # energy of each lagged window
        corr = np.correlate(seg, frame, "valid") / np.sqrt(energy * np.dot(frame, frame) + 1e-12)
        best = float(corr[lo:].max())
        if best < 0.7:  # unvoiced or silent
            continue
        # The first peak near the best one is the period: later peaks (2T, 3T) are octave errors.
        peaks = [lag for lag in range(lo, hi) if corr[lag - 1] <= corr[lag] >= corr[lag + 1]]
        lag = next((p for p in peaks if corr[p] >= 0.9 * best), int(lo + np.argmax(corr[lo:])))
        f0s.append(sample_rate / lag)
    if not f0s:
        raise ValueError("no voiced frames: cannot measure f0")
    return float(np.median(f0s))


@dataclass(frozen=True)
class _Spoken:
    high: bool  # the voice's pitch: the answer
    word: str  # what is said: contradicts the voice in about half the items
    pitch: int
    speed: int


def _draw(rng: np.random.Generator, difficulty: int) -> _Spoken:
    (lo_min, lo_max), (hi_min, hi_max) = for_difficulty(difficulty, SPOKEN_PITCH_SETTINGS)
    high = bool(rng.integers(2))
    conflict = bool(rng.integers(2))
    word = ("low" if high else "high") if conflict else ("high" if high else "low")
    pitch = int(rng.integers(hi_min, hi_max + 1) if high else rng.integers(lo_min, lo_max + 1))
    return _Spoken(high=high, word=word, pitch=pitch, speed=int(rng.integers(140, 201)))


def _reasoning(f0: float, high: bool) -> str:
    answer = "high" if high else "low"
    side = "above" if high else "below"
    evidence = (
        f"The voice's fundamental frequency stays near {rounded_hz(f0)} Hz. "
        f"That is {side} the {SPEECH_BOUNDARY_HZ} Hz midpoint, so the voice is {answer}."
    )
    return think(evidence, answer)


def spoken_pitch_conflict(rng: np.random.Generator, difficulty: int, sample_rate: int) -> Example:
    """A spoken "high" or "low" in a high or low voice: is the voice high or low? (not the word)"""
    spoken = _draw(rng, difficulty)
    voice = speak(spoken.word, spoken.pitch, spoken.speed, sample_rate)
    voice = voice * (rng.uniform(0.3, 0.8) / float(np.abs(voice).max()))  # random level
    audio = finish(
        [silence(rng.uniform(0.1, 0.3), sample_rate), voice, silence(rng.uniform(0.1, 0.3), sample_rate)],
        rng,
        0.002,
    )
    answer = "high" if spoken.high else "low"
    return Example(
        audio=audio,
        question=QUESTION,
        free_question=FREE_QUESTION,
        choices=["high", "low"],
        answer=answer,
        reasoning=_reasoning(median_f0(audio, sample_rate), spoken.high),
        category="speech",
        transcript=spoken.word,
    )


def spoken_pitch_texts(rng: np.random.Generator, difficulty: int) -> list[str]:
    """The texts of a `spoken_pitch_conflict` item without synthesizing it (f0 from the calibration)."""
    spoken = _draw(rng, difficulty)
    pitches, f0s = zip(*_F0_AT_PITCH)
    return [QUESTION, FREE_QUESTION, _reasoning(float(np.interp(spoken.pitch, pitches, f0s)), spoken.high)]
