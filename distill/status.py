"""`distill status RUN_DIR`: where a run stands, read from the run directory alone.

Per round: the stages finished (with their time), and for the stage under way the work already
on disk (sample and grounding shards, items of a half-written server shard, training steps) with
an ETA from the rate so far; then the processes writing the run now (its locks). It never changes
anything, so it is safe beside a running job.
"""

from __future__ import annotations

import time
from functools import partial
from pathlib import Path

from omegaconf import OmegaConf

from distill.core.files import read_json, read_jsonl
from distill.core.locks import describe, live_holders, locks_dir
from distill.core.rundir import RoundDir, RunDir
from distill.core.stages import Stage, stage_named
from distill.slurm import jobs_status


def _duration(seconds: float) -> str:
    seconds = max(0, int(seconds))
    h, rest = divmod(seconds, 3600)
    m, s = divmod(rest, 60)
    return f"{h}h{m:02d}m" if h else (f"{m}m{s:02d}s" if m else f"{s}s")


def _mtime(path: Path) -> float | None:
    return path.stat().st_mtime if path.exists() else None


def stage_start(run: RunDir, rd: RoundDir, stage: str) -> float | None:
    """When `stage` of `rd` could start: when the stage before it finished (its stats file), or
    for a round's first stage when the previous round finished."""
    stages = rd.stages
    i = stages.index(stage)
    if i > 0:
        return _mtime(rd.stats_dir / f"{stages[i - 1]}.json")
    prev = run.round(rd.index - 1)
    return _mtime(prev.stats_dir / f"{prev.stages[-1]}.json") if rd.index > 0 else None


def eta(done: int, total: int, started: float | None, last: float | None, now: float) -> str:
    """'ETA 3m10s' from the mean time per unit of work finished so far, '' when unknown."""
    if not done or started is None or last is None or done >= total:
        return ""
    per_unit = max(last - started, 1e-9) / done
    return f", ETA {_duration(per_unit * (total - done) - (now - last))}"


def shard_progress(run: RunDir, rd: RoundDir, stage: Stage, shards: int, now: float) -> str:
    folder, path_of = rd.path / stage.shard_dir, partial(rd.shard_file, stage.shard_dir)
    done = [path_of(i, shards) for i in range(shards) if path_of(i, shards).exists()]
    text = f"{len(done)}/{shards} shards on disk"
    items = 0
    for unfinished in folder.glob(".*.partial*") if folder.exists() else []:
        try:
            items += unfinished.read_text().count("\n")
        except FileNotFoundError:
            pass  # the shard was finished (and its partial file removed) meanwhile
    if items:
        text += f" (+{items} item(s) of a shard in progress)"
    last = max((p.stat().st_mtime for p in done), default=None)
    return text + eta(len(done), shards, stage_start(run, rd, stage.name), last, now)


def train_progress(folder: Path, now: float) -> str:
    """Steps done of a trainer's plan (train/ or rl/: plan.json, log.jsonl), with the last loss (and
    an RL step's reward and accuracy) and the ETA."""
    plan, log = folder / "plan.json", folder / "log.jsonl"
    if not plan.exists():
        return "not started"
    total = read_json(plan)["total_steps"]
    lines = list(read_jsonl(log)) if log.exists() else []
    if not lines:
        return f"0/{total} steps (starting)"
    step = lines[-1]["step"]
    last = lines[-1]
    text = f"step {step}/{total}, loss {last['loss']:.4f}"
    if "reward/reward" in last:
        text += f", reward {last['reward/reward']:.3f}, accuracy {last['accuracy']:.1%}"
    # Seconds per step from this process's log (elapsed_s restarts when a resumed stage starts).
    timed = [r for r in lines if "elapsed_s" in r]
    run_start = max(
        (i for i in range(1, len(timed)) if timed[i]["elapsed_s"] < timed[i - 1]["elapsed_s"]), default=0
    )
    timed = timed[run_start:]
    if len(timed) >= 2 and step < total:
        per_step = (timed[-1]["elapsed_s"] - timed[0]["elapsed_s"]) / (timed[-1]["step"] - timed[0]["step"])
        text += (
            f", {per_step:.2f} s/step, "
            f"ETA {_duration(per_step * (total - step) - (now - log.stat().st_mtime))}"
        )
    return text


def round_status(run: RunDir, rd: RoundDir, shards: int, now: float) -> list[str]:
    last = rd.last_stage()
    stats = rd.stats()
    done = [s for s in rd.stages if rd.is_done(s)]
    timing = ", ".join(f"{s} {_duration(stats.get(s, {}).get('seconds') or 0)}" for s in done)
    head = f"round {rd.index}: " + (f"finished {last} ({timing})" if last else "nothing finished yet")
    lines = [head]
    ev = stats.get("eval")
    if ev:
        lines.append(
            f"  held-out accuracy {ev['accuracy']:.1%}"
            + (
                f", maj@{ev['k']} {ev['majority_accuracy']:.1%}"
                if ev.get("majority_accuracy") is not None
                else ""
            )
        )
    if len(done) == len(rd.stages):
        return lines
    stage = stage_named(rd.stages[len(done)])
    if stage.progress == "shards":
        progress = shard_progress(run, rd, stage, shards, now)
    elif stage.progress == "steps":
        progress = train_progress(rd.path / stage.writes[0], now)
    else:
        progress = "no progress on disk until it finishes"
    lines.append(f"  next: {stage.name}: {progress}")
    return lines


def run_status(run_dir: Path) -> str:
    """The status text of the run at `run_dir`."""
    run = RunDir(run_dir)
    if not run.config.exists():
        raise ValueError(f"{run_dir}: no config.yaml (not a distill run directory, or it never started)")
    # Only three numbers of the config: read as saved, not validated (its data files, benchmarks
    # or templates need not exist on the machine that asks).
    saved = OmegaConf.load(run.config)
    rounds_wanted, shards = int(saved.loop.rounds), int(saved.sample.num_shards)
    first = 0 if saved.cold_start.enabled else 1
    now = time.time()
    rounds = run.rounds()
    lines = [
        (
            f"run {run.path}: {len(rounds)} of {rounds_wanted + 1 - first} round(s) started "
            f"(loop.rounds={rounds_wanted})"
        )
    ]
    for rd in rounds:
        lines.extend(round_status(run, rd, shards, now))
    if not rounds or (rounds[-1].is_done("eval") and rounds[-1].index < rounds_wanted):
        nxt = rounds[-1].index + 1 if rounds else first
        lines.append(f"round {nxt}: not started")
    holders = live_holders(locks_dir(run.path), "")
    if holders:
        lines += ["Running now (RUN/locks/):", *(f"  {unit}: {describe(record)}" for unit, record in holders)]
    jobs = jobs_status(run)
    if jobs:
        lines += ["Slurm jobs (RUN/slurm/jobs.jsonl):", *jobs]
    return "\n".join(lines)
