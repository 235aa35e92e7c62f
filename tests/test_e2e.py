"""End-to-end runs of `distill run` with the real engines (vLLM on CPU, DeepSpeed ZeRO on 2 gloo ranks)."""

import json
import os
import shlex
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import psutil
import pytest

from distill.core.files import read_json, read_jsonl
from distill.core.locks import read_record
from distill.core.processes import OWNER_ENV
from distill.export.model_card import serve_launcher
from distill.rollout.engine import weights_hash

pytestmark = pytest.mark.e2e

# Small but real: the cold start must teach the format well enough that round 1's filter keeps
# traces (a round that keeps none stops the loop with an error, as it should).
TINY_RUN = [
    "data.synthetic.train_items=12",
    "data.synthetic.eval_items=8",
    "sample.n=4",
    "sample.max_tokens=48",
    "sample.temperature=0.7",
    "sample.num_shards=3",
    "eval.max_tokens=48",
    "eval.budgets=[0,16,48]",
    "eval.k=2",
    "cold_start.train.epochs=100",
    "cold_start.train.max_steps=60",
    "cold_start.train.micro_batch_size=4",
    "cold_start.train.learning_rate=2e-3",
    "train.epochs=10",
    "train.max_steps=2",
    "train.micro_batch_size=2",
    "loop.rounds=2",
]


def run_command(out: Path, *overrides: str, config: str | Path = "configs/demo_cpu.yaml") -> list[str]:
    return [
        sys.executable,
        "-m",
        "distill.cli",
        "run",
        str(config),
        f"output_dir={out}",
        *TINY_RUN,
        *overrides,
    ]


def distill_run(
    out: Path, *overrides: str, config: str | Path = "configs/demo_cpu.yaml", **popen
) -> subprocess.Popen:
    """Start `distill run`; its output goes to a file (a pipe nobody reads would fill and block it)."""
    log = (out / "run.log").open("a")
    proc = subprocess.Popen(
        run_command(out, *overrides, config=config), stdout=log, stderr=subprocess.STDOUT, text=True, **popen
    )
    proc.log_path = out / "run.log"  # type: ignore[attr-defined]
    return proc


def output(proc: subprocess.Popen) -> str:
    return proc.log_path.read_text(errors="replace")  # type: ignore[attr-defined]


def finish(proc: subprocess.Popen, timeout: int = 600) -> str:
    proc.wait(timeout=timeout)
    text = output(proc)
    assert proc.returncode == 0, text[-4000:]
    return text


def traces(round_dir: Path) -> list[dict]:
    return [t for shard in sorted((round_dir / "samples").glob("shard-*.jsonl")) for t in read_jsonl(shard)]


def outcome(run: Path) -> dict:
    """What a finished run produced, round by round: weights, kept traces, loss, held-out accuracy."""
    return {
        rd.name: {
            "weights": read_json(rd / "model" / "distill_export.json")["weights_sha256"],
            "kept": read_json(rd / "stats" / "filter.json")["kept"],
            "final_loss": read_json(rd / "stats" / "train.json")["final_loss"],
            "accuracy": read_json(rd / "eval.json")["accuracy"],
        }
        for rd in sorted(run.glob("round_*"))
    }


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory) -> tuple[Path, str, dict]:
    """The tiny two-round run, never interrupted: its output folder, its log and its outcome."""
    out = tmp_path_factory.mktemp("uninterrupted")
    log = finish(distill_run(out))
    return out, log, outcome(out / "demo_cpu")


@pytest.mark.xdist_group("uninterrupted")
def test_two_rounds_end_to_end(uninterrupted, tmp_path):
    out, log, _ = uninterrupted
    run = out / "demo_cpu"
    assert "heldout_acc" in log and "0 (cold start)" in log
    assert (run / "config.yaml").exists() and (run / "base_model" / "model.safetensors").exists()
    hashes = {}
    for i in range(3):
        rd = run / f"round_{i:03d}"
        assert (rd / "STAGE").read_text().strip() == "eval"
        export = read_json(rd / "model" / "distill_export.json")
        exported = export["weights_sha256"]
        assert exported == weights_hash(rd / "model") and export["gate"] == "passed"
        summary = read_json(rd / "stats" / "train.json")
        assert summary["processes"] == 2 and summary["zero_stage"] == 2  # two DeepSpeed ranks really ran
        hashes[i] = exported
        ev = read_json(rd / "eval.json")
        answers = list(read_jsonl(rd / "eval_samples.jsonl"))
        assert ev["items"] == len(answers) == 8
        assert ev["accuracy"] == round(sum(a["correct"] for a in answers) / 8, 4)
        # Every round is measured the same way: pass@k, majority vote, the thinking-budget curve
        # (its last point never below greedy: a trace cut there only gains a forced answer), the gap.
        assert set(ev["pass_at"]) == {"1", "2"} and ev["majority_accuracy"] is not None
        assert list(ev["budgets"]) == ["0", "16", "48"] and ev["budgets"]["48"] >= ev["accuracy"]
        assert set(ev["grounding"]["gap_by_kind"]) == {"silence", "swap"}
        # A budget costs an answer only where it cut the trace; the others keep their own answer.
        cut = sum(
            1
            for a in answers
            for b in (0, 16, 48)
            if a["reasoning_tokens"] is None or a["reasoning_tokens"] > b
        )
        assert ev["requests"]["budget_answers"] == cut and ev["requests"]["samples"] == 8 * 2
        assert all(list(a["budgets"]) == ["0", "16", "48"] and len(a["samples"]) == 2 for a in answers)
        for f in ("chat_template.jinja", "tokenizer.json", "processor_config.json", "config.json"):
            assert (rd / "model" / f).exists(), f
        # The gate held vLLM to transformers; the card gained the held-out numbers after eval.
        assert export["agreement"]["mean_abs_diff"] < 0.05 and export["serve"].startswith(
            shlex.join(serve_launcher())
        )
        assert f"Held-out accuracy {ev['accuracy']:.1%}" in (rd / "model" / "README.md").read_text()
    assert len(set(hashes.values())) == 3, "every round must train new weights"
    for i in (1, 2):
        rows = traces(run / f"round_{i:03d}")
        assert len(rows) == 12 * 4 and len({r["trace_id"] for r in rows}) == 48
        # Round i sampled from round i-1's exported weights: the lineage proves it.
        assert {r["lineage"]["model_sha256"] for r in rows} == {hashes[i - 1]}
        assert all(r["completion"].startswith("<think>\n") for r in rows)
        stats = read_json(run / f"round_{i:03d}" / "stats" / "filter.json")
        kept = list(read_jsonl(run / f"round_{i:03d}" / "filtered.jsonl"))
        rejected = list(read_jsonl(run / f"round_{i:03d}" / "rejected.jsonl"))
        assert len(kept) == stats["kept"] and len(kept) + len(rejected) == 48
        assert sum(stats["rejected_by_reason"].values()) == len(rejected)
        assert all(r["rejected_because"] for r in rejected)
        # Grounding ran between sampling and filtering on the same engine: every item probed with
        # real and counterfactual audio, every trace that passed the rules scored, and the filter
        # applied the audio-dependence threshold to them.
        ground = read_json(run / f"round_{i:03d}" / "stats" / "ground.json")
        assert ground["items"] == 12 and set(ground["probe_accuracy"]) == {"real", "silence", "noise", "swap"}
        assert len(list((run / f"round_{i:03d}" / "grounding").glob("shard-*-of-00003.jsonl"))) == 3
        assert all(
            r["checks"]["audio_dependence"] == "pass" and r["grounding"]["dependence"] >= 0 for r in kept
        )
        assert ground["traces_scored"] == len(kept) + sum("grounding" in r for r in rejected)
    # The LR schedule advances once per optimizer step, whatever the number of ranks.
    from distill.config import load_config
    from distill.training.optim import lr_lambda

    tcfg = load_config(run / "config.yaml").train
    steps = list(read_jsonl(run / "round_001" / "train" / "log.jsonl"))
    expected = [tcfg.learning_rate * lr_lambda(tcfg.warmup_steps, 2)(s) for s in range(2)]
    assert [r["lr"] for r in steps] == pytest.approx(expected)
    metrics = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert [m["round"] for m in metrics] == [0, 1, 2]
    assert metrics[2]["sampled_from_sha256"] == hashes[1] and metrics[2]["train_steps"] == 2
    assert all(m["grounding_gap"] is not None and 0 < m["grounding_cost"] for m in metrics[1:])
    assert "gap" in log and "text_solv" in log and "budget_acc" in log and "maj@k" in log
    assert all(m["budget_accuracy"] and 0 < m["eval_share"] < 1 for m in metrics)
    # wandb got the report's charts and a table of sample traces with their audio.
    offline = list((run / "wandb").glob("offline-run-*"))
    assert offline and list(offline[0].glob("files/media/images/charts/*.png"))
    assert list(offline[0].glob("files/media/table/sample_traces_*.table.json"))
    table = json.loads(next(offline[0].glob("files/media/table/sample_traces_*.table.json")).read_text())
    assert table["columns"][-1] == "audio" and len(table["data"]) == 4
    # The table's audio is staged as artifact files (uploaded by `wandb sync`), inside the run dir.
    staged = list((run / "wandb" / "artifacts" / "staging").iterdir())
    assert sum(p.read_bytes()[:4] == b"RIFF" for p in staged) >= 4
    # The report of the real run, and its status.
    cli = [sys.executable, "-m", "distill.cli"]
    done = subprocess.run([*cli, "report", str(run)], capture_output=True, text=True)
    assert done.returncode == 0, done.stderr[-3000:]
    page = (run / "report.html").read_text()
    assert page.count("data:image/png;base64,") == 5 and page.count("<audio controls") == 3 * 3
    done = subprocess.run([*cli, "status", str(run)], capture_output=True, text=True)
    assert done.returncode == 0 and "round 2: finished eval" in done.stdout, done.stderr[-3000:]
    # Re-evaluating a round with other eval settings (and an MMAU-style benchmark with a missing
    # clip) rewrites its numbers, not the run's config.
    config_before = (run / "config.yaml").read_text()
    bench = benchmark_file(tmp_path)
    done = subprocess.run(
        [
            *cli,
            "eval",
            str(run / "round_002"),
            "eval.budgets=[0,8]",
            "eval.k=0",
            f"eval.benchmarks=[{{name: mmau-mini, path: {bench}, format: mmau}}]",
        ],
        capture_output=True,
        text=True,
    )
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    ev = read_json(run / "round_002" / "eval.json")
    assert list(ev["budgets"]) == ["0", "8"] and "pass_at" not in ev
    rejects = list(read_jsonl(run / "data" / "rejects" / "benchmark-mmau-mini.jsonl"))
    assert [r["reason"] for r in rejects] == ["missing_file"] and rejects[0]["where"].startswith(f"{bench}:")
    b = ev["benchmarks"]["mmau-mini"]
    bench_rows = list(read_jsonl(run / "round_002" / "eval_benchmarks" / "mmau-mini.jsonl"))
    assert b["items"] == len(bench_rows) == 3 and set(b["per_category"]) == {"sound"}
    for r in (
        bench_rows
    ):  # an answer naming one option exactly is right by MMAU's matching iff it is the reference
        line = r["completion"].rsplit("</think>", 1)[-1].strip().lower()
        if line in r["choices"]:
            assert r["mmau_correct"] == (line == r["reference"]), r
    assert read_json(run / "round_002" / "stats" / "eval.json")["budgets"] == ev["budgets"]
    assert json.loads((run / "metrics.jsonl").read_text().splitlines()[2])["budget_accuracy"] == ev["budgets"]
    assert (run / "config.yaml").read_text() == config_before
    bad = subprocess.run([*cli, "eval", str(run / "round_002"), "sample.n=2"], capture_output=True, text=True)
    assert bad.returncode == 2 and "eval.* overrides only" in bad.stderr

    # `distill export ROUND_DIR` of an exported round changes nothing and says how to serve it; of a
    # trained round not yet exported (here: its marker set back to train) it runs the stage as the
    # loop does: the same weights, the gate passed again, the serve command printed.
    r2 = run / "round_002"
    serve = read_json(r2 / "stats" / "export.json")["serve"]
    weights = weights_hash(r2 / "model")
    done = subprocess.run([*cli, "export", str(r2)], capture_output=True, text=True)
    assert done.returncode == 0 and "exported already" in done.stdout, (
        done.stdout[-3000:] + done.stderr[-3000:]
    )
    assert done.stdout.strip().endswith(f"serve it with: {serve}")
    bad = subprocess.run([*cli, "export", str(r2), "eval.k=2"], capture_output=True, text=True)
    assert bad.returncode == 2 and "export.* overrides only" in bad.stderr
    (r2 / "STAGE").write_text("train\n")
    done = subprocess.run([*cli, "export", str(r2), "export.probes=2"], capture_output=True, text=True)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    assert (r2 / "STAGE").read_text().strip() == "export" and weights_hash(r2 / "model") == weights
    stats = read_json(r2 / "stats" / "export.json")
    assert len(stats["gate_probes"]) == 2 and stats["serve"] == serve
    assert done.stdout.strip().endswith(f"serve it with: {serve}")

    # A stage run before the one it reads from has finished is refused, before any work (the stage
    # before export is rl, a marker when RL is off).
    stage = [sys.executable, "-m", "distill.cli", "stage"]
    args = ["configs/demo_cpu.yaml", "--round", "3", f"output_dir={out}", *TINY_RUN, "loop.rounds=3"]
    early = subprocess.run([*stage, "export", *args], capture_output=True, text=True)
    assert early.returncode == 1 and "stage 'export' needs 'rl' finished first" in early.stderr


def run_processes(out: Path, token: str) -> list[psutil.Process]:
    """Live processes of the run in `out`: by the run's path on their command line (distill, the
    launcher, the ranks), or by the owner token distill gave them (wandb's service too)."""
    found = []
    for p in psutil.process_iter():
        try:
            if (
                p.pid != os.getpid()
                and p.status() != psutil.STATUS_ZOMBIE
                and (str(out) in " ".join(p.cmdline()) or p.environ().get(OWNER_ENV) == token)
            ):
                found.append(p)
        except psutil.Error:
            continue
    return found


def gone_after_kill(out: Path, token: str, bound: float = 10.0) -> float:
    """Seconds until no process of the run is left; fails past `bound`."""
    start = time.monotonic()
    while left := run_processes(out, token):
        assert time.monotonic() - start < bound, [" ".join(p.cmdline())[:120] for p in left]
        time.sleep(0.05)
    return time.monotonic() - start


def wait_for_training(proc: subprocess.Popen, train_dir: Path) -> None:
    """Until the training ranks `proc` started have logged a step, with the stage not finished."""
    deadline = time.time() + 480
    log = train_dir / "log.jsonl"
    while True:
        assert proc.poll() is None, output(proc)[-4000:]
        assert time.time() < deadline, "training never started"
        ranks = []
        for p in psutil.Process(proc.pid).children(recursive=True):
            try:
                if "RANK" in p.environ():  # the launcher's command names train.py too
                    ranks.append(p.create_time())
            except psutil.Error:  # a helper process that just ended
                continue
        if len(ranks) == 2 and log.exists() and log.stat().st_mtime > max(ranks):
            break
        time.sleep(0.05)
    assert not (train_dir / "final").exists(), "the stage finished before it could be interrupted"


def files(folder: Path) -> dict[str, tuple[int, int]]:
    return {str(p): (p.stat().st_size, p.stat().st_mtime_ns) for p in folder.rglob("*") if p.is_file()}


@pytest.mark.xdist_group("uninterrupted")
def test_a_killed_run_leaves_no_process_and_resumes_to_the_uninterrupted_result(uninterrupted, tmp_path):
    """SIGKILL of `distill run`'s process group, then of distill alone, in the middle of training:
    within seconds no process of the run is left (the ranks run in sessions of their own and used
    to survive both), nothing is written after, and the re-run ends where an uninterrupted run does.
    A second `distill run` on a live run is refused at once, naming the owner."""
    run, train = tmp_path / "demo_cpu", tmp_path / "demo_cpu" / "round_000" / "train"
    # Saving the training state every 5 steps (how work is done, not what it makes: the same
    # weights) gives the resumed runs a state to resume and the kills a wider window.
    saves = "cold_start.train.save_steps=5"
    first = distill_run(tmp_path, saves, start_new_session=True)
    while (read_record(run / "locks" / "run.lock") or {}).get("pid") != first.pid:
        assert first.poll() is None, output(first)[-4000:]
        time.sleep(0.05)
    second = subprocess.run(run_command(tmp_path, saves), capture_output=True, text=True, timeout=120)
    assert second.returncode == 1, second.stdout[-2000:] + second.stderr[-2000:]
    assert f"PID {first.pid} on {socket.gethostname()}" in second.stderr
    wait_for_training(first, train)
    token = read_record(run / "locks" / "run.lock")["token"]
    assert run_processes(tmp_path, token)
    status = subprocess.run(
        [sys.executable, "-m", "distill.cli", "status", str(run)], capture_output=True, text=True
    )
    assert f"  run: PID {first.pid} on {socket.gethostname()}" in status.stdout, status.stdout + status.stderr
    assert f"  round_000.train: PID {first.pid}" in status.stdout

    os.killpg(first.pid, signal.SIGKILL)  # what a terminal's kill of the job or a container stop does
    first.wait()
    group_kill = gone_after_kill(tmp_path, token)

    resumed = distill_run(tmp_path, saves, start_new_session=True)
    wait_for_training(resumed, train)
    token = read_record(run / "locks" / "run.lock")["token"]
    resumed.kill()  # distill alone: its launcher and ranks are not signalled
    resumed.wait()
    alone_kill = gone_after_kill(tmp_path, token)
    written = files(run)
    time.sleep(3)
    assert files(run) == written and not (train / "final").exists(), (
        "a process wrote after distill was killed"
    )

    before = len(output(resumed))
    log = finish(distill_run(tmp_path, saves))[before:]
    assert f"taking over from PID {resumed.pid} on {socket.gethostname()}" in log
    assert not run_processes(tmp_path, token)
    assert outcome(run) == uninterrupted[2]
    print(f"all processes gone {group_kill:.2f} s after the group kill, {alone_kill:.2f} s after distill's")


def benchmark_file(tmp_path: Path) -> Path:
    """An MMAU-style JSON list (audio paths relative to the file) with one item whose audio is missing."""
    from data_pipelines.synthetic import generate_split

    items = generate_split(tmp_path / "mmau", "eval", ["pitch_level"], 3, 5, 1, 16000)
    rows = [
        {
            "id": f"mmau-{i}",
            "audio_id": str(it.audio).split("mmau/", 1)[1],
            "question": it.question,
            "choices": it.choices,
            "answer": it.answer,
            "task": "sound",
            "sub-category": "pitch",
        }
        for i, it in enumerate(items)
    ]
    rows.append({**rows[0], "id": "mmau-gone", "audio_id": "audio/nowhere.wav"})
    path = tmp_path / "mmau" / "test-mini.json"
    path.write_text(json.dumps(rows, indent=1))
    return path


def mixed_sources_config(tmp_path: Path) -> tuple[Path, dict[str, str]]:
    """The demo config with its train items from two sources in two formats, mixed 2:1, each with
    bad items; returns the config and the reason each bad item must be rejected for."""
    from omegaconf import OmegaConf

    from data_pipelines.audio import write_wav
    from data_pipelines.items import write_manifest
    from data_pipelines.synthetic import generate_split

    src = tmp_path / "sources"
    good = generate_split(src, "train", ["pitch_level"], 12, 0, 1, 16000)
    write_manifest(src / "eval.jsonl", generate_split(src, "eval", ["pitch_level"], 8, 0, 1, 16000))
    write_wav(src / "audio" / "silence.wav", np.zeros(16000, dtype=np.float32), 16000)
    lines = [json.dumps(it.to_json()) for it in good[:8]]
    lines += [
        "{not json",
        json.dumps({**good[0].to_json(), "id": "gone", "audio": "audio/nowhere.wav"}),
        json.dumps({**good[0].to_json(), "id": "quiet", "audio": "audio/silence.wav"}),
    ]
    (src / "a.jsonl").write_text("\n".join(lines) + "\n")
    mmau = [
        {
            "id": it.id,
            "audio_id": it.audio,
            "question": it.question,
            "choices": it.choices,
            "answer": it.answer,
            "task": "sound",
            "difficulty": "easy",
            "reasoning": it.reasoning,
        }
        for it in good[8:]
    ]
    mmau.append({**mmau[0], "id": "no-such-choice", "answer": "medium"})
    text = json.dumps(mmau, indent=1)
    (src / "b.json").write_text(text)
    last_object_line = [i + 1 for i, line in enumerate(text.splitlines()) if line == " {"][-1]
    cfg = OmegaConf.load("configs/demo_cpu.yaml")
    cfg.data = {
        "train_mix": [
            {"path": str(src / "a.jsonl"), "weight": 2},
            {"path": str(src / "b.json"), "weight": 1},
        ],
        "eval_manifest": str(src / "eval.jsonl"),
    }
    # The rounds' SFT data: kept traces plus text chain of thought and direct-answer audio items.
    cot = [
        {
            "question": f"What is {i} plus {i}?",
            "reasoning": f"{i} and {i} make {2 * i}.",
            "answer": str(2 * i),
        }
        for i in range(5)
    ]
    (src / "cot.jsonl").write_text("".join(json.dumps(r) + "\n" for r in cot))
    write_manifest(src / "direct.jsonl", good[:4])
    cfg.train.mix = [
        {"kind": "text_cot", "path": str(src / "cot.jsonl"), "weight": 0.5},
        {"kind": "direct_audio", "path": str(src / "direct.jsonl"), "weight": 0.25},
    ]
    OmegaConf.save(cfg, tmp_path / "mixed.yaml")
    bad = {
        f"{src / 'a.jsonl'}:9": "malformed",
        f"{src / 'a.jsonl'}:10": "missing_file",
        f"{src / 'a.jsonl'}:11": "silent",
        f"{src / 'b.json'}:{last_object_line}": "answer_not_in_choices",
    }
    return tmp_path / "mixed.yaml", bad


def test_interrupted_after_sampling_resumes_without_redoing_work(tmp_path):
    """Also: a run whose train items come from a JSONL manifest and an MMAU-style JSON file, both
    with bad items, reports the bad ones with file, line and reason, and trains on the good ones."""
    config, bad = mixed_sources_config(tmp_path)
    run = tmp_path / "demo_cpu"
    samples = run / "round_001" / "samples"
    # ZeRO-3 here (ZeRO-2 above): its gathered 16-bit weights must export to a model vLLM loads;
    # the rounds train LoRA adapters, merged at export.
    overrides = (
        "train.zero_stage=3",
        "cold_start.train.zero_stage=3",
        "train.lora.enabled=true",
        "train.lora.r=8",
        "loop.rounds=1",
    )
    proc = distill_run(tmp_path, *overrides, config=config, start_new_session=True)
    deadline = time.time() + 480
    while not list(samples.glob("shard-*.jsonl")):
        assert proc.poll() is None, output(proc)[-4000:]
        assert time.time() < deadline, "sampling never started"
        time.sleep(0.05)
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    on_disk = {p.name: (p.stat().st_ino, p.stat().st_mtime_ns) for p in samples.glob("shard-*.jsonl")}
    r0_train = (run / "round_000" / "train" / "final" / "train_summary.json").stat().st_mtime_ns
    data_files = {p: p.stat().st_mtime_ns for p in (run / "data").rglob("*.jsonl")}

    before = len(output(proc))
    log = finish(distill_run(tmp_path, *overrides, config=config))[before:]
    assert "round 0: train" not in log, "the finished cold start was redone"
    for name, ident in on_disk.items():
        p = samples / name
        assert (p.stat().st_ino, p.stat().st_mtime_ns) == ident, f"{name} was sampled again"
    assert (run / "round_000" / "train" / "final" / "train_summary.json").stat().st_mtime_ns == r0_train
    assert {p: p.stat().st_mtime_ns for p in (run / "data").rglob("*.jsonl")} == data_files, "data rebuilt"
    rows = traces(run / "round_001")
    assert len(rows) == 12 * 4 and len({r["trace_id"] for r in rows}) == 48
    assert f"{len(on_disk)} shard(s) already on disk" in log
    assert (run / "round_001" / "STAGE").read_text().strip() == "eval" and not (run / "round_002").exists()
    summary = read_json(run / "round_001" / "stats" / "train.json")
    assert summary["zero_stage"] == 3 and summary["lora"] and summary["encoder_cache"] is None
    # Round 1 continues from the cold start's model on its kept traces, mixed with the extra data at
    # its weights.
    assert Path(summary["model"]) == run / "round_000" / "model"
    assert summary["data"] == [str(run / "round_001" / "filtered.jsonl")]
    kept = len(list(read_jsonl(run / "round_001" / "filtered.jsonl")))
    assert summary["mix"]["traces"]["rows"] == kept
    assert summary["mix"]["text_cot:cot.jsonl"]["rows"] == round(kept * 0.5)
    assert summary["mix"]["direct_audio:direct.jsonl"]["rows"] == round(kept * 0.25)
    assert summary["rows"] == summary["mix"]["total"]
    # The resumed run continues the same wandb run.
    assert len({p.name.rsplit("-", 1)[1] for p in (run / "wandb").glob("offline-run-*")}) == 1

    # Mixed sources: bad items set aside with file, line and reason; the good ones mixed 2:1 and trained on.
    rejects = {r["where"]: r["reason"] for r in read_jsonl(run / "data" / "rejects" / "train.jsonl")}
    assert rejects == bad
    first = output(proc)[:before]
    assert all(f"rejected {where}: {reason}" in first for where, reason in bad.items())
    train_ids = {json.loads(line)["id"] for line in (run / "data" / "train.jsonl").read_text().splitlines()}
    assert len(train_ids) == 12 and not train_ids & {"gone", "quiet", "no-such-choice"}
    stats = read_json(run / "data" / "stats" / "train.json")["sources"]
    assert [s["mixed_in"] for s in stats] == [8, 4]
    cold = {r["id"] for r in read_jsonl(run / "round_000" / "filtered.jsonl")}
    assert cold == train_ids and {r["item_id"] for r in rows} == train_ids


def test_chunked_long_audio_runs_in_vllm(tmp_path, tiny_model, capfd):
    """data.audio.long_audio=chunk: a 40 s recording reaches vLLM as two audio inputs of 20 s with
    two placeholders in the prompt, as training sees it (tests/test_sft_data.py)."""
    from data_pipelines.audio import write_wav
    from data_pipelines.items import Item
    from distill.config import load_config
    from distill.data import audio_cache, max_audio_items
    from distill.models.tokens import load_tokenizer
    from distill.rollout.engine import EngineCache, generate, item_request

    cfg = load_config(
        "configs/demo_cpu.yaml",
        [
            f"output_dir={tmp_path}",
            f"model.path={tiny_model}",
            "data.audio.long_audio=chunk",
            "data.audio.max_chunks=2",
            "engine.max_model_len=2048",
            "train.max_seq_len=2048",
            "cold_start.train.max_seq_len=2048",
        ],
    )
    rate = cfg.data.sample_rate
    t = np.arange(40 * rate) / rate
    write_wav(tmp_path / "long.wav", (0.3 * np.sin(2 * np.pi * 440 * t)).astype(np.float32), rate)
    item = Item(id="long", audio=str(tmp_path / "long.wav"), question="Is it high or low?", answer="high")
    request = item_request(cfg, load_tokenizer(str(tiny_model)), item, audio_cache(cfg))
    assert [len(a) for a in request.audio] == [20 * rate] * 2 and request.prompt.count("<|AUDIO|>") == 2
    before = os.environ.get("VLLM_ENABLE_V1_MULTIPROCESSING")
    with EngineCache(cfg.engine, cfg.seed, max_audio_items(cfg.data)) as engines:
        llm = engines.get(tiny_model)
        (out,) = generate(llm, [request], 0.0, 1.0, 8)
        # The step budget reaches vLLM, which sizes its encoder cache by it (configs/demo_cpu.yaml).
        scheduler = llm.llm_engine.vllm_config.scheduler_config
        assert (
            scheduler.max_num_batched_tokens
            == scheduler.encoder_cache_size
            == cfg.engine.max_num_batched_tokens
        )
        assert llm.llm_engine.vllm_config.cache_config.block_size == cfg.engine.block_size == 32
        # On CPU the engine runs in this process (engine.process=auto): no engine process started,
        # and the switch that told vLLM so is not left for the processes this one starts.
        assert not [
            p for p in psutil.Process().children(recursive=True) if "VLLM" in p.name() or "Engine" in p.name()
        ]
        assert os.environ.get("VLLM_ENABLE_V1_MULTIPROCESSING") == before
    assert out.num_tokens > 0
    assert "torch.set_num_threads" not in capfd.readouterr().err  # vLLM's warning per request, filtered
