"""The HTML report and `distill status` on a run directory written by hand (no engine): what the
page shows, that it renders in headless Chromium with every chart decoded, and the status text."""

import json
import shutil
import subprocess

import numpy as np
import pytest

from data_pipelines.audio import write_wav
from distill.core.files import atomic_write_json, atomic_write_jsonl, atomic_write_text
from distill.core.rundir import RunDir
from distill.report import write_report
from distill.report.metrics import format_table, round_record
from distill.status import run_status

CHARTS = 5


def fake_run(tmp_path, inverted_round: int = 2):
    """A run of three rounds (cold start + 2) as the stages leave it on disk; round 2's thinking
    curve falls at the largest budget. Returns the run directory."""
    from distill.config import load_config, to_yaml

    run = RunDir(tmp_path / "demo")
    run.path.mkdir()
    atomic_write_text(
        run.config, to_yaml(load_config("configs/demo_cpu.yaml", [f"output_dir={tmp_path}", "run_name=demo"]))
    )
    clip = tmp_path / "tone.wav"
    t = np.arange(16000) / 16000
    write_wav(clip, (0.3 * np.sin(2 * np.pi * 440 * t)).astype(np.float32), 16000)
    for i in range(3):
        rd = run.round(i)
        curve = {"0": 0.3 + 0.1 * i, "16": 0.5 + 0.1 * i, "64": 0.2 if i == inverted_round else 0.6 + 0.1 * i}
        inverted = (
            {"from_budget": 16, "from_accuracy": curve["16"], "to_budget": 64, "to_accuracy": 0.2}
            if i == inverted_round
            else None
        )
        ev = {
            "items": 4,
            "accuracy": 0.5 + 0.1 * i,
            "format_rate": 1.0,
            "mean_tokens": 20,
            "k": 4,
            "per_family": {"pitch_level": 0.5},
            "per_category": {"pitch": 0.5},
            "budgets": curve,
            "inverted_scaling": inverted,
            "pass_at": {"1": 0.4, "4": 0.8},
            "majority_accuracy": 0.55,
            "grounding": {"gap": 0.1 * i, "gap_by_kind": {"silence": 0.1 * i, "swap": 0.05}, "by_kind": {}},
            "traces": {
                "greedy": {
                    "traces": 4,
                    "reasoning_tokens": {"n": 4, "mean": 12, "p10": 8, "p50": 12, "p90": 16},
                    "truncated_rate": 0.0,
                    "format_error_rate": 0.25,
                    "language_drift_rate": 0.0,
                    "degeneration_rate": 0.0,
                },
                "sampled": None,
            },
            "benchmarks": {"mmau-mini": {"items": 3, "accuracy": 0.33, "mmau_accuracy": 0.33 + 0.1 * i}},
        }
        stages = (
            ["filter", "train", "export", "eval"]
            if i == 0
            else ["sample", "ground", "filter", "train", "export", "eval"]
        )
        for stage in stages:
            stats = {"seconds": 10.0}
            if stage == "filter" and i:
                stats.update(
                    traces=32,
                    kept=8,
                    kept_fraction=0.25,
                    sample_accuracy=0.4,
                    prompts=4,
                    rejected_by_reason={"answer:wrong": 16, "format:think_block": 6, "truncated": 2},
                )
            if stage == "eval":
                stats.update(ev)
            if stage == "ground":
                stats.update(grounding_gap=0.02)
            rd.mark_done(stage, stats)
        atomic_write_json(rd.eval_json, ev)
        rows = [
            {
                "item_id": f"eval-{j}",
                "audio": str(clip),
                "question": "Is the tone high or low?",
                "choices": ["high", "low"],
                "category": "pitch",
                "family": "pitch_level",
                "completion": f"<think>\nround {i}: the pitch is <high> & steady\n</think>\nhigh",
                "reference": "high" if j % 2 == 0 else "low",
                "correct": j % 2 == 0,
                "reasoning_tokens": 10 + j,
                "budgets": {"0": False, "16": True, "64": True},
                "counterfactual": {"silence": False},
            }
            for j in range(4)
        ]
        atomic_write_jsonl(rd.path / "eval_samples.jsonl", rows)
        atomic_write_jsonl(rd.filtered, [{"reasoning_tokens": 5 + j} for j in range(8)] if i else [{}])
    return run.path


def test_report_shows_every_round_chart_and_sample(tmp_path):
    run = fake_run(tmp_path)
    out = write_report(run, tmp_path / "report.html", samples=2)
    page = out.read_text()
    assert page.count('<img alt="') == CHARTS and page.count("data:image/png;base64,") == CHARTS
    assert page.count("<audio controls") == 3 * 2  # two sample traces per round, each with its clip
    assert "data:audio/wav;base64," in page and "audio not found" not in page
    # The inverted round is called out, in the table and in its section; nothing else is.
    assert (
        page.count("(inverted)") == 1
        and "accuracy falls from 70.0% at 16 thinking tokens to 20.0% at 64" in page
    )
    assert "mmau-mini" in page and "0 (cold start)" in page
    # Trace text is escaped: a model's output cannot inject markup into the page.
    assert "the pitch is &lt;high&gt; &amp; steady" in page and "<high>" not in page
    # A sample with its audio gone says so instead of breaking the page.
    (tmp_path / "tone.wav").unlink()
    assert "audio not found" in write_report(run, tmp_path / "r2.html", samples=1).read_text()


def test_report_refuses_a_folder_without_rounds(tmp_path):
    with pytest.raises(ValueError, match="no round_NNN directories"):
        write_report(tmp_path, tmp_path / "report.html")


CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")


@pytest.mark.skipif(
    CHROMIUM is None, reason="needs Debian's chromium (apt-get install chromium; .ci/run installs it)"
)
def test_report_renders_in_headless_chromium(tmp_path):
    from PIL import Image

    out = write_report(fake_run(tmp_path), tmp_path / "report.html")
    base = [
        CHROMIUM,
        "--headless",
        "--no-sandbox",
        "--disable-gpu",
        "--hide-scrollbars",
        "--virtual-time-budget=10000",
    ]
    dom = subprocess.run([*base, "--dump-dom", out.as_uri()], capture_output=True, text=True, timeout=120)
    assert dom.returncode == 0, dom.stderr[-2000:]
    # The page's own check ran after load: every chart decoded as an image, none broken.
    assert f'data-images-loaded="{CHARTS}"' in dom.stdout and 'data-images-broken="0"' in dom.stdout
    shot = tmp_path / "report.png"
    done = subprocess.run(
        [*base, f"--screenshot={shot}", "--window-size=1200,2400", out.as_uri()],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode == 0 and shot.exists(), done.stderr[-2000:]
    pixels = np.asarray(Image.open(shot).convert("L"))
    assert pixels.shape == (2400, 1200)
    assert (pixels < 200).mean() > 0.03  # text, tables and charts drawn, not a blank page


def test_status_shows_finished_rounds_and_the_running_stage(tmp_path):
    run = fake_run(tmp_path)
    rd = RunDir(run).round(3)
    # Round 3 is sampling: 2 of 4 shards on disk, a third half-written by a server backend.
    rd.samples_dir.mkdir(parents=True)
    for shard in (0, 1):
        atomic_write_text(rd.shard_path(shard, 4), "{}\n")
    atomic_write_text(
        rd.samples_dir / ".shard-00002-of-00004.partial.jsonl", '{"item_id": "a"}\n{"item_id": "b"}\n'
    )
    text = run_status(run)
    assert "round 0: finished eval" in text and "round 2: finished eval" in text
    assert "held-out accuracy 70.0%, maj@4 55.0%" in text
    assert "round 3: nothing finished yet" in text
    assert "next: sample: 2/4 shards on disk (+2 item(s) of a shard in progress), ETA" in text
    # Training under way: steps from the log, the total from the plan, an ETA from the pace so far.
    rd4 = RunDir(run).round(4)
    for stage in ("sample", "ground", "filter"):
        rd4.mark_done(stage, {"seconds": 1.0})
    atomic_write_json(rd4.train_dir / "plan.json", {"total_steps": 100})
    log = [{"step": s, "loss": 1.0 / s, "lr": 1e-3, "elapsed_s": 2.0 * s} for s in range(1, 11)]
    atomic_write_text(rd4.train_dir / "log.jsonl", "".join(json.dumps(r) + "\n" for r in log))
    text = run_status(run)
    # 90 steps left at 2 s a step, less the moment since the last log line.
    assert "next: train: step 10/100, loss 0.1000, 2.00 s/step, ETA 2m" in text, text
    # RL under way: its step, reward and accuracy from rl/log.jsonl, the ETA from its pace.
    rd4.mark_done("train", {"seconds": 1.0})
    atomic_write_json(rd4.rl_dir / "plan.json", {"total_steps": 20})
    log = [
        {"step": s, "loss": 0.01, "reward/reward": 0.5 + s / 100, "accuracy": 0.25, "elapsed_s": 3.0 * s}
        for s in range(1, 5)
    ]
    atomic_write_text(rd4.rl_dir / "log.jsonl", "".join(json.dumps(r) + "\n" for r in log))
    text = run_status(run)
    assert "next: rl: step 4/20, loss 0.0100, reward 0.540, accuracy 25.0%, 3.00 s/step, ETA" in text, text


def test_the_report_and_the_table_show_what_rl_did(tmp_path):
    run = fake_run(tmp_path)
    # Round 1's band was empty (RL skipped); round 2 ran 3 RL steps, its reasoning collapsing.
    atomic_write_json(
        RunDir(run).round(1).stats_dir / "rl.json", {"skipped": "no item has 3 to 6", "steps": 0}
    )
    rd = RunDir(run).round(2)
    atomic_write_json(rd.stats_dir / "rl.json", {"steps": 3, "band_items": 5})
    warning = "mean reasoning length fell to 40 tokens, 40% of the 100 RL started from"
    lines = [
        {
            "step": s,
            "reward/reward": 0.4 + 0.15 * s,
            "accuracy": 0.3 + 0.1 * s,
            "reasoning_tokens_mean": 100 / s,
            "reasoning_tokens_p90": 150 / s,
            "kl": 0.0,
            "clip_fraction": 0.01,
            **({"warning": warning} if s == 3 else {}),
        }
        for s in (1, 2, 3)
    ]
    atomic_write_jsonl(rd.rl_dir / "log.jsonl", lines)
    page = write_report(run, tmp_path / "report.html", samples=1).read_text()
    assert page.count('<img alt="') == CHARTS + 1 and '<img alt="RL steps"' in page
    assert "RL: 3 steps on 5 items of the pass-rate band; mean reward 0.550 &rarr; 0.850" in page
    assert f"RL step 3: {warning}" in page and "RL skipped: no item has 3 to 6" in page
    table = format_table([round_record(r) for r in RunDir(run).rounds()])
    assert "0.55->0.85" in table and " skip " in table
