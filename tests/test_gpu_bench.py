"""bench/gpu_train.py, the GPU readiness script, run on CPU at the tiny size so that it cannot rot
before a GPU runs it: both trainers train, and every figure it reports is there."""

import json
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


@pytest.mark.e2e
def test_gpu_bench_runs_on_cpu_at_the_tiny_size(tmp_path):
    out = tmp_path / "gpu_train.json"
    done = subprocess.run(
        [
            sys.executable,
            "bench/gpu_train.py",
            "--size",
            "tiny",
            "--device",
            "cpu",
            "--items",
            "8",
            "--traces-per-item",
            "2",
            "--repeats",
            "1",
            "--work",
            str(tmp_path / "work"),
            "--out",
            str(out),
        ],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=900,
    )
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    result = json.loads(out.read_text())
    base, distill = result["settings"]["baseline_hf_trainer"], result["settings"]["distill"]
    assert result["data"]["rows"] == 16 and result["model"]["text_hidden"] == 128
    for s in (base, distill):
        assert s["tokens_per_s"] > 0 and 0 <= s["padding_share"] < 1 and s["steps"] >= 1
        assert s["mfu"] is None and s["peak_memory_gib"] is None  # CPU: no peak FLOP/s, no GPU memory
    # The same rows and the same trainable parameters (encoder frozen) on both sides.
    assert (
        base["tokens"] == distill["tokens"]
        and base["trainable_parameters"] == distill["trainable_parameters"]
    )
    assert distill["processes"] == 1 and result["ratio_vs_baseline"] > 0
