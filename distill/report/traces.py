"""Sample traces of a round for people to read and hear: in the HTML report and in wandb."""

from __future__ import annotations

import io
from pathlib import Path

import numpy as np
import soundfile as sf

from distill.core.files import read_jsonl
from distill.core.rundir import RoundDir


def sample_traces(rd: RoundDir, n: int) -> list[dict]:
    """Up to `n` of the round's held-out eval rows, a right and a wrong answer in turn (so a page
    shows both), each side in item order."""
    path = rd.path / "eval_samples.jsonl"
    if n <= 0 or not path.exists():
        return []
    rows = list(read_jsonl(path))
    right = [r for r in rows if r["correct"]]
    wrong = [r for r in rows if not r["correct"]]
    picked = []
    while len(picked) < n and (right or wrong):
        for side in (right, wrong):
            if side and len(picked) < n:
                picked.append(side.pop(0))
    return picked


def wav_bytes(path: str | Path) -> bytes | None:
    """The audio file as WAV bytes (WAV as it is; other formats decoded and re-encoded as 16-bit
    PCM), or None when it cannot be read."""
    path = Path(path)
    try:
        if path.suffix.lower() == ".wav":
            return path.read_bytes()
        data, rate = sf.read(str(path), dtype="float32", always_2d=False)
    except (OSError, RuntimeError, sf.LibsndfileError):
        return None
    buf = io.BytesIO()
    sf.write(buf, np.asarray(data), rate, format="WAV", subtype="PCM_16")
    return buf.getvalue()
