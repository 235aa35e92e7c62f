"""Benchmark: validate + decode + resample of a folder of audio files, first run and cached run,
against plain soundfile-decode-per-use, all measured in this one run on the same files.

    .venv/bin/python bench/audio_pipeline.py [--files 3000] [--workers 2]
        [--out bench/results/audio_pipeline.json]

The files are written by the benchmark (WAV 44.1 kHz stereo, FLAC 22.05 kHz, WAV 16 kHz; 1-3 s).
- baseline: what a stage does without the pipeline: sf.read, mix down, soxr to 16 kHz, every use.
- first run: `distill`'s validation of the manifest (schema, hashing, every audio check, decode,
  resample) filling an empty audio cache.
- cached run: what every later stage and round does: the cache lookup by the hash validation
  recorded (np.load of the prepared waveform).
- cached + hash: a fresh validation on a warm cache (hashes the files again, no decoding).
Ratios are items/s of each against the baseline; "per round" projects a run that uses each file
in 3 stages per round (sample, train, eval).
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import soundfile as sf
import soxr

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from data_pipelines.audio import AudioPolicy
from data_pipelines.audio_cache import AudioCache
from data_pipelines.readers import read_source
from data_pipelines.validate import validate_records

RATE = 16000
KINDS = (("wav", 44100, 2), ("flac", 22050, 1), ("wav", 16000, 1))


def make_files(folder: Path, n: int) -> Path:
    rng = np.random.default_rng(0)
    lines = []
    for i in range(n):
        ext, rate, channels = KINDS[i % len(KINDS)]
        seconds = rng.uniform(1.0, 3.0)
        t = np.arange(int(seconds * rate)) / rate
        wave = 0.3 * np.sin(2 * np.pi * rng.uniform(150, 1500) * t) + rng.normal(0, 0.01, len(t))
        data = np.stack([wave] * channels, axis=1) if channels > 1 else wave
        name = f"{i:05d}.{ext}"
        sf.write(folder / name, data.astype(np.float32), rate, subtype="PCM_16")
        lines.append(json.dumps({"id": str(i), "audio": name, "question": "q", "answer": "a"}))
    manifest = folder / "manifest.jsonl"
    manifest.write_text("\n".join(lines) + "\n")
    return manifest


def plain_decode(paths: list[str]) -> float:
    start = time.perf_counter()
    for path in paths:
        data, rate = sf.read(path, dtype="float32", always_2d=True)
        mono = data.mean(axis=1)
        if rate != RATE:
            mono = soxr.resample(mono, rate, RATE)
    return time.perf_counter() - start


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--files", type=int, default=3000)
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--out", default="bench/results/audio_pipeline.json")
    args = ap.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        manifest = make_files(folder, args.files)
        policy = AudioPolicy(sample_rate=RATE)
        cache = AudioCache(folder / "cache", policy)
        paths = [str(folder / json.loads(line)["audio"]) for line in manifest.read_text().splitlines()]
        plain_decode(paths[:50])  # warm the page cache and libraries for every contender alike

        t_plain = plain_decode(paths)
        start = time.perf_counter()
        report = validate_records(read_source(manifest), cache, workers=args.workers)
        t_first = time.perf_counter() - start
        assert len(report.items) == args.files and not report.rejects, report.by_reason()
        start = time.perf_counter()
        for item in report.items:
            cache.get(item.audio, item.audio_sha256)
        t_cached = time.perf_counter() - start
        start = time.perf_counter()
        rehashed = validate_records(
            read_source(manifest), AudioCache(folder / "cache", policy), workers=args.workers
        )
        t_rehash = time.perf_counter() - start
        assert len(rehashed.items) == args.files

    n = args.files
    uses_per_round = 3
    result = {
        "files": n,
        "workers": args.workers,
        "audio_minutes": round(report.audio_seconds / 60, 1),
        "machine": f"{platform.machine()}, {platform.python_version()}",
        "items_per_s": {
            "baseline_plain_decode": round(n / t_plain, 1),
            "first_run_validate": round(n / t_first, 1),
            "cached_run": round(n / t_cached, 1),
            "cached_plus_hash": round(n / t_rehash, 1),
        },
        "ratio_vs_baseline": {
            "first_run_validate": round(t_plain / t_first, 2),
            "cached_run": round(t_plain / t_cached, 2),
            "cached_plus_hash": round(t_plain / t_rehash, 2),
        },
        # A run of R rounds uses each file 3 times a round; the pipeline decodes it once.
        "ratio_per_round_of_3_uses": {
            f"{r}_rounds": round(
                r * uses_per_round * t_plain / (t_first + (r * uses_per_round - 1) * t_cached), 2
            )
            for r in (1, 2, 5)
        },
    }
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
