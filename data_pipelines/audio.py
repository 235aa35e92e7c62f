"""Audio decoding and checks: soundfile decodes, soxr resamples (torchaudio is not usable beside CPU torch).

`prepare_audio` is the one path from a file to the waveform a model hears: decode, check (readable,
complete, non-empty, finite, not silent, a usable sample rate), mix down to mono, resample, and apply
the length policy (reject, truncate, or allow up to `max_chunks` chunks of `chunk_seconds`).
Every failure is an AudioError carrying a stable reason code, which validation reports and counts.
"""

from __future__ import annotations

import dataclasses
import hashlib
import io
import math
import os
import re
import tempfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import soundfile as sf
import soxr


class AudioError(ValueError):
    """An audio input cannot be used. `reason` is a stable code (counted in reports); the message
    names the file and says why."""

    def __init__(self, source: str | Path, reason: str, detail: str):
        super().__init__(f"{source}: {detail}")
        self.reason = reason
        self.detail = detail


@dataclass(frozen=True)
class AudioPolicy:
    """What the model accepts. Built from the `data.audio` config (data_pipelines/config.py)."""

    sample_rate: int = 16000
    # Longest audio accepted as one item. Step-Audio serves at most 29.98 s per audio item and
    # Whisper-style feature extractors silently cut at 30 s, so longer audio must be handled here.
    max_seconds: float = 30.0
    long_audio: str = "reject"
    chunk_seconds: float = 25.0
    max_chunks: int = 4
    # Upsampling cannot restore what a low-rate recording never captured (nothing above rate/2).
    min_sample_rate: int = 8000
    # Peak amplitude at or below this (about -80 dBFS) counts as silence.
    silence_peak: float = 1e-4

    def key(self) -> str:
        """A tag of every setting (part of cache keys: an entry made under laxer checks or another
        length policy is never served)."""
        return hashlib.sha256(repr(dataclasses.astuple(self)).encode()).hexdigest()[:16]

    def chunk_samples(self) -> int:
        return int(self.chunk_seconds * self.sample_rate)


_DECLARED_SIZE = re.compile(r"^data\s*:\s*(\d+)\s*\(should be (\d+)\)", re.MULTILINE)
# Sizes that streaming writers put in a WAV header before they know the length: not a truncation.
_STREAMING_SIZES = (0, 0xFFFFFFFF, 0x7FFFFFFF)


def _truncation_note(extra: str) -> str | None:
    """libsndfile reads what is there of a cut-off WAV or Ogg file and says so only in its log."""
    match = _DECLARED_SIZE.search(extra)
    if match and int(match.group(1)) not in _STREAMING_SIZES and int(match.group(2)) < int(match.group(1)):
        return f"the header declares {match.group(1)} data bytes, the file holds {match.group(2)}"
    if "ended unexpectedly" in extra:
        return "the stream ends without its end-of-stream mark"
    return None


def decode_audio(
    source: str | Path | bytes,
    name: str | Path | None = None,
    max_seconds: float = math.inf,
    truncate: bool = False,
) -> tuple[np.ndarray, int]:
    """Decode a file path or raw file bytes to (mono float32, native rate), checking it is whole.

    Audio longer than `max_seconds` is refused before it is read (or, with `truncate`, only its
    first `max_seconds` are read), so a two-hour file never fills memory. Raises AudioError with
    reason missing_file, unreadable, truncated, empty, nonfinite or too_long.
    """
    name = name or (source if not isinstance(source, bytes) else "<inline audio>")
    if not isinstance(source, bytes) and not Path(source).is_file():
        raise AudioError(name, "missing_file", "audio file does not exist")
    handle = io.BytesIO(source) if isinstance(source, bytes) else str(source)
    try:
        with sf.SoundFile(handle) as f:
            note = _truncation_note(f.extra_info)
            rate, declared = f.samplerate, f.frames
            limit = int(max_seconds * rate) if math.isfinite(max_seconds) else None
            if limit is not None and declared > limit and not truncate:
                raise AudioError(
                    name, "too_long", f"{declared / rate:.2f} s is longer than the {max_seconds:g} s allowed"
                )
            wanted = min(declared, limit) if limit is not None else declared
            data = f.read(frames=wanted if declared > 0 else -1, dtype="float32", always_2d=True)
    except AudioError:
        raise
    except Exception as exc:  # soundfile raises several types for unreadable files
        raise AudioError(name, "unreadable", f"cannot decode audio ({exc})") from None
    if note is not None:
        raise AudioError(name, "truncated", f"file is cut off ({note})")
    if 0 < declared and data.shape[0] < wanted:
        raise AudioError(name, "truncated", f"file is cut off ({data.shape[0]} of {wanted} frames decoded)")
    if data.shape[0] == 0:
        raise AudioError(name, "empty", "zero-length audio")
    if limit is not None and data.shape[0] > limit:  # a header that did not declare its length
        if not truncate:
            raise AudioError(
                name, "too_long", f"{data.shape[0] / rate:.2f} s is longer than the {max_seconds:g} s allowed"
            )
        data = data[:limit]
    mono = data.mean(axis=1)
    if not np.isfinite(mono).all():
        raise AudioError(name, "nonfinite", "audio contains NaN or inf samples")
    return mono, rate


def prepare_audio(
    source: str | Path | bytes, policy: AudioPolicy, name: str | Path | None = None
) -> np.ndarray:
    """Decode, check and resample `source` to `policy.sample_rate`, applying the length policy.

    Raises AudioError (see decode_audio) or with reason low_rate or silent.
    """
    name = name or (source if not isinstance(source, bytes) else "<inline audio>")
    chunked = policy.long_audio == "chunk"
    limit = policy.max_chunks * policy.chunk_seconds if chunked else policy.max_seconds
    try:
        mono, rate = decode_audio(source, name, limit, truncate=policy.long_audio == "truncate")
    except AudioError as exc:
        if exc.reason == "too_long":  # name the setting that decides
            raise AudioError(
                name, exc.reason, f"{exc.detail} (data.audio.long_audio={policy.long_audio})"
            ) from None
        raise
    if rate < policy.min_sample_rate:
        raise AudioError(
            name,
            "low_rate",
            f"sample rate {rate} Hz is below data.audio.min_sample_rate={policy.min_sample_rate}",
        )
    if float(np.abs(mono).max()) <= policy.silence_peak:  # after truncation: what the model would hear
        raise AudioError(name, "silent", f"silence only (peak {float(np.abs(mono).max()):.2e})")
    if rate != policy.sample_rate:
        mono = soxr.resample(mono, rate, policy.sample_rate)
    if chunked and len(mono) > policy.max_chunks * policy.chunk_samples():
        # Resampling may add a few samples: the chunk count, not the float seconds, is the limit.
        mono = mono[: policy.max_chunks * policy.chunk_samples()]
    return np.ascontiguousarray(mono, dtype=np.float32)


def split_chunks(audio: np.ndarray, max_samples: int) -> list[np.ndarray]:
    """The fewest near-equal consecutive chunks of at most `max_samples` each (the Step-Audio
    client sends pieces of at most 25 s; equal pieces never leave a sliver of a last chunk)."""
    count = max(1, math.ceil(len(audio) / max_samples))
    return np.array_split(audio, count)


def write_wav(path: str | Path, audio: np.ndarray, sample_rate: int) -> None:
    """Write 16-bit PCM WAV atomically (unique temp name, then rename: parallel writers are safe)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.close(fd)
    try:
        sf.write(tmp, audio, sample_rate, subtype="PCM_16", format="WAV")
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
