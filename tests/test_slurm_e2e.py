"""`distill slurm submit` on a real one-node Slurm cluster on localhost (launch/local-cluster-start.sh):
the array tasks sample their shards with their own vLLM engines, the training job runs DeepSpeed
on 2 ranks, the chain completes, and a resubmission after a cancelled array task fills only the
missing shard."""

import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest
from omegaconf import OmegaConf

from distill.core.files import read_json, read_jsonl
from distill.core.locks import read_record

pytestmark = pytest.mark.e2e

LAUNCH = Path(__file__).resolve().parents[1] / "launch"
# A random tiny model keeps no trace through the rule checks, so the filter checks nothing here:
# the test is about scheduling, and every stage still runs its real engine.
SMALL = {
    "run_name": "slurm",
    "data": {"synthetic": {"train_items": 4, "eval_items": 2}},
    "sample": {"n": 2, "max_tokens": 16, "num_shards": 2},
    "cold_start": {"enabled": False},
    "grounding": {"enabled": False},
    "filter": {"checks": []},
    "train": {"max_steps": 2, "micro_batch_size": 2, "epochs": 1},
    "eval": {"max_tokens": 16, "budgets": [0, 8], "k": 0, "counterfactuals": ["silence"]},
    "export": {"probes": 1},
    "wandb": {"mode": "disabled"},
    "slurm": {"cpus_per_task": 2, "time_sample": "20:00", "time_train": "20:00", "time_eval": "20:00"},
}


@pytest.fixture(scope="module")
def slurm_conf(tmp_path_factory):
    if shutil.which("slurmctld") is None or shutil.which("munged") is None:
        pytest.skip("needs Debian's slurmctld, slurmd, slurm-client and munge (.ci/run installs them)")
    if os.geteuid() != 0:
        pytest.skip("the test cluster's daemons run as root")
    state = tmp_path_factory.mktemp("slurm-cluster")
    # Four CPUs declared on this two-core machine: both array tasks (2 CPUs each) run at once.
    # Slurm's default dependency handling (as on most clusters): a job whose afterok dependency
    # failed stays pending for ever; resubmission must cancel and replace it.
    env = {**os.environ, "SLURM_CPUS": "4", "SLURM_FRESH": "1", "SLURM_KILL_INVALID_DEPEND": "0"}
    started = subprocess.run(
        [str(LAUNCH / "local-cluster-start.sh"), str(state)],
        env=env,
        capture_output=True,
        text=True,
        timeout=180,
    )
    assert started.returncode == 0, started.stderr[-3000:]
    conf = str(state / "slurm.conf")
    old = os.environ.get("SLURM_CONF")
    os.environ["SLURM_CONF"] = conf
    yield conf
    subprocess.run([str(LAUNCH / "local-cluster-stop.sh"), str(state)], capture_output=True, timeout=120)
    if old is None:
        os.environ.pop("SLURM_CONF", None)
    else:
        os.environ["SLURM_CONF"] = old


def squeue(reasons: bool = False) -> dict[str, str]:
    """Task id ('12_1', '13') -> state (with the reason a pending job waits), for every job the
    cluster knows."""
    out = subprocess.run(
        ["squeue", "--noheader", "--array", "--states=all", "--format=%i|%T|%r"],
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    rows = [line.split("|") for line in out.splitlines()]
    return {
        task: f"{state} {reason}" if reasons and state == "PENDING" else state for task, state, reason in rows
    }


def wait_until(predicate, timeout: float, what: str):
    deadline = time.time() + timeout
    while time.time() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(0.5)
    raise AssertionError(f"timed out after {timeout:.0f}s waiting for {what}; queue: {squeue()}")


def settled(job_ids: list[str]) -> bool:
    """Every task of these jobs has ended."""
    active = {"PENDING", "RUNNING", "CONFIGURING", "COMPLETING"}
    return not any(state in active for task, state in squeue().items() if task.split("_")[0] in job_ids)


def submit(cfg: Path, run: Path) -> tuple[str, list[dict]]:
    done = subprocess.run(
        [sys.executable, "-m", "distill.cli", "slurm", "submit", str(cfg), "--rounds", "1"],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    return done.stdout, list(read_jsonl(run / "slurm" / "jobs.jsonl"))


def logs(run: Path) -> str:
    return "\n".join(
        f"== {p.name}\n{p.read_text(errors='replace')[-3000:]}"
        for p in sorted((run / "slurm" / "logs").glob("*.out"))
    )


def test_a_round_runs_as_chained_jobs_and_resumes_after_a_cancelled_task(tmp_path, slurm_conf):
    cfg = tmp_path / "slurm.yaml"
    OmegaConf.save(
        OmegaConf.merge(OmegaConf.load("configs/demo_cpu.yaml"), {"output_dir": str(tmp_path), **SMALL}), cfg
    )
    run = tmp_path / "slurm"
    out, jobs = submit(cfg, run)
    assert [j["key"] for j in jobs] == ["r001-sample", "r001-filter", "r001-train", "r001-eval"], out
    sample = jobs[0]["job_id"]
    # Cancel array task 1 while it runs: its shard never lands, and the filter job chained after
    # the array can never start (afterok); the jobs after it wait on it.
    wait_until(lambda: squeue().get(f"{sample}_1") == "RUNNING", 120, "array task 1 to run")
    # Array tasks lock their own shard and run side by side.
    shard_lock = run / "locks" / "round_001.sample.shard-00001-of-00002.lock"
    holder = wait_until(lambda: read_record(shard_lock), 120, "array task 1 to lock its shard")
    subprocess.run(["scancel", f"{sample}_1"], check=True)
    filter_id, train_id, eval_id = (j["job_id"] for j in jobs[1:])
    wait_until(
        lambda: settled([sample]) and squeue(True).get(filter_id) == "PENDING DependencyNeverSatisfied",
        300,
        "the array to end and the filter job to be stuck",
    )
    states = squeue(True)
    assert states[f"{sample}_0"] == "COMPLETED" and states[f"{sample}_1"] == "CANCELLED", (states, logs(run))
    assert states[train_id] == states[eval_id] == "PENDING Dependency", states
    samples = run / "round_001" / "samples"
    assert [p.name for p in samples.glob("shard-*")] == ["shard-00000-of-00002.jsonl"], logs(run)
    first_shard = (samples / "shard-00000-of-00002.jsonl").stat()
    # Cancelled, the task left its shard's lock to be taken over (Slurm's SIGTERM ends it at once).
    assert read_record(shard_lock) == holder
    status = subprocess.run(
        [sys.executable, "-m", "distill.cli", "status", str(run)], capture_output=True, text=True
    )
    assert f"slurm r001-sample [0,1]: job {sample} 1 CANCELLED, 1 COMPLETED" in status.stdout, status.stdout

    # Resubmitted: the stuck jobs are cancelled, one array task samples the missing shard, and the
    # rest of the chain is submitted again behind it.
    out, jobs = submit(cfg, run)
    assert f"cancelled job(s) {filter_id}, {train_id}, {eval_id}" in out, out
    new = jobs[4:]
    assert [(j["key"], j["shards"]) for j in new] == [
        ("r001-sample", [1]),
        ("r001-filter", None),
        ("r001-train", None),
        ("r001-eval", None),
    ], out
    wait_until(lambda: settled([filter_id, train_id, eval_id]), 60, "the stuck jobs to be cancelled")
    wait_until(lambda: settled([j["job_id"] for j in new]), 600, "the resubmitted chain to end")
    states = squeue()
    assert all(states.get(f"{j['job_id']}_1" if j["shards"] else j["job_id"]) == "COMPLETED" for j in new), (
        states,
        logs(run),
    )
    rd = run / "round_001"
    assert (rd / "STAGE").read_text().strip() == "eval", logs(run)
    text = "".join(p.read_text(errors="replace") for p in (run / "slurm" / "logs").glob("*.out"))
    assert f"round_001.sample.shard-00001-of-00002: taking over from PID {holder['pid']}" in text
    assert not any(read_record(p) for p in (run / "locks").glob("*.lock")), (
        "a finished job left its lock held"
    )
    again = (samples / "shard-00000-of-00002.jsonl").stat()
    assert (again.st_ino, again.st_mtime_ns) == (first_shard.st_ino, first_shard.st_mtime_ns)  # not resampled
    traces = [t for p in sorted(samples.glob("shard-*")) for t in read_jsonl(p)]
    assert len(traces) == 8 and len({t["trace_id"] for t in traces}) == 8
    assert sorted({t["lineage"]["shard"] for t in traces}) == ["0/2", "1/2"]
    train = read_json(rd / "stats" / "train.json")
    assert (
        train["processes"] == 2 and train["zero_stage"] == 2 and train["steps"] == 2
    )  # DeepSpeed on 2 ranks
    assert read_json(rd / "model" / "distill_export.json")["gate"] == "passed"
    assert read_json(rd / "eval.json")["items"] == 2
    assert json.loads((run / "metrics.jsonl").read_text().splitlines()[-1])["heldout_accuracy"] is not None
    # Nothing left to do: a third submission submits nothing.
    out, _ = submit(cfg, run)
    assert "nothing to submit" in out
