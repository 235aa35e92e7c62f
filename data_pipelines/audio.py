"""Audio decoding: soundfile to decode, soxr to resample (torchaudio is not usable beside CPU torch)."""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

import numpy as np
import soundfile as sf
import soxr


class AudioError(ValueError):
    """An audio file cannot be used; the message names the file and the reason."""


def load_audio(path: str | Path, sample_rate: int) -> np.ndarray:
    """Decode `path` to mono float32 at `sample_rate`."""
    try:
        data, rate = sf.read(str(path), dtype="float32", always_2d=True)
    except Exception as exc:  # soundfile raises several types for unreadable files
        raise AudioError(f"{path}: cannot decode audio ({exc})") from None
    if data.shape[0] == 0:
        raise AudioError(f"{path}: zero-length audio")
    mono = data.mean(axis=1)
    if not np.isfinite(mono).all():
        raise AudioError(f"{path}: audio contains NaN or inf samples")
    if rate != sample_rate:
        mono = soxr.resample(mono, rate, sample_rate)
    return mono.astype(np.float32, copy=False)


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
