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

import hashlib
import os
import tempfile
from pathlib import Path

import numpy as np

from data_pipelines.audio import AudioError, AudioPolicy, prepare_audio, split_chunks


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
        """The prepared waveform of `path`; see `load`."""
        return self.load(path, sha256)[0]

    def load(self, path: str | Path, sha256: str | None = None) -> tuple[np.ndarray, str]:
        """(prepared waveform, sha256 of the file's bytes) of `path`; raises AudioError as
        prepare_audio does. With `sha256` (validated items carry it) a hit needs no read of the
        file; on a miss the bytes are read once, hashed and decoded, and a file whose bytes no
        longer match the given hash is refused (reason "changed"), never cached under the old one."""
        if sha256 and self.root is not None:
            audio = self._read(self.entry(sha256))
            if audio is not None:
                self.hits += 1
                return audio, sha256
        if not Path(path).is_file():
            raise AudioError(path, "missing_file", "audio file does not exist")
        data = Path(path).read_bytes()
        actual = hashlib.sha256(data).hexdigest()
        if sha256 and actual != sha256:
            raise AudioError(
                path,
                "changed",
                f"the file changed since it was validated (sha256 {sha256[:12]}, now "
                f"{actual[:12]}); validate the data again (a new run)",
            )
        audio = self._read(self.entry(actual)) if self.root is not None else None
        if audio is not None:
            self.hits += 1
            return audio, actual
        audio = prepare_audio(data, self.policy, name=path)
        if self.root is not None:
            self._store(self.entry(actual), audio)
        self.misses += 1
        return audio, actual

    def chunks(self, path: str | Path, sha256: str | None = None) -> list[np.ndarray]:
        """The model's audio inputs for one item: the whole waveform, or its chunks when the
        policy splits long audio (data.audio.long_audio=chunk)."""
        audio = self.get(path, sha256)
        if self.policy.long_audio != "chunk":
            return [audio]
        return split_chunks(audio, self.policy.chunk_samples())

    @staticmethod
    def _read(entry: Path) -> np.ndarray | None:
        try:
            return np.load(entry, allow_pickle=False)
        except (FileNotFoundError, ValueError, EOFError, OSError):  # absent, or cut short by a crash
            return None

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
