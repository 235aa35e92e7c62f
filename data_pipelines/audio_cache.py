"""A content-addressed cache of prepared waveforms, shared by every stage (and process) of a run.

Sampling, training, eval and the export gate all need the same audio at the model's rate, round
after round. The cache keys a waveform by the sha256 of the file's bytes plus the settings that
shape it (rate, length policy), so each file is decoded and resampled once per run, and a file
whose bytes change gets a new entry rather than a stale one. Entries are `.npy` files written to a
unique temp name and renamed: any number of processes (Slurm array tasks, training ranks) may
fill the cache at once, a reader never sees half an entry, and two writers of one entry write the
same bytes. An unreadable entry (a crash mid-copy on some file systems) counts as a miss.
"""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

import numpy as np

from data_pipelines.audio import AudioPolicy, prepare_audio, split_chunks
from distill.io import sha256_file


class AudioCache:
    """Prepared audio by content hash. `root=None` disables caching (every call decodes)."""

    def __init__(self, root: str | Path | None, policy: AudioPolicy):
        self.root = Path(root) if root else None
        self.policy = policy
        self.hits = 0
        self.misses = 0

    def entry(self, sha256: str) -> Path:
        assert self.root is not None
        return self.root / sha256[:2] / f"{sha256}-{self.policy.key()}.npy"

    def get(self, path: str | Path, sha256: str | None = None) -> np.ndarray:
        """The prepared waveform of `path` (raises AudioError as prepare_audio does). Pass the file's
        `sha256` when it is known (validated items carry it) to skip hashing the file."""
        if self.root is None:
            self.misses += 1
            return prepare_audio(path, self.policy)
        entry = self.entry(sha256 or sha256_file(path))
        try:
            audio = np.load(entry, allow_pickle=False)
            self.hits += 1
            return audio
        except (FileNotFoundError, ValueError, EOFError, OSError):
            pass
        audio = prepare_audio(path, self.policy)
        self._store(entry, audio)
        self.misses += 1
        return audio

    def chunks(self, path: str | Path, sha256: str | None = None) -> list[np.ndarray]:
        """The model's audio inputs for one item: the whole waveform, or its chunks when the
        policy splits long audio (data.audio.long_audio=chunk)."""
        audio = self.get(path, sha256)
        if self.policy.long_audio != "chunk":
            return [audio]
        return split_chunks(audio, self.policy.sample_rate, self.policy.chunk_seconds)

    @staticmethod
    def _store(entry: Path, audio: np.ndarray) -> None:
        entry.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=entry.parent, prefix=f".{entry.name}.", suffix=".tmp")
        try:
            with os.fdopen(fd, "wb") as handle:
                np.save(handle, audio, allow_pickle=False)
            os.replace(tmp, entry)
        except BaseException:
            Path(tmp).unlink(missing_ok=True)
            raise
