"""Slurm: a run's rounds as chained jobs (`distill slurm submit CONFIG --rounds N`).

Per round, each job after the one before it (afterok), and round r+1 after round r:

    job      shape                                   runs
    sample   array, one task per missing shard       distill stage sample   (its own vLLM engine)
    ground   array, one task per missing shard       distill stage ground   (grounding.enabled)
    filter   one task                                distill stage filter   (+ ground when grounding is off)
    train    slurm.train_nodes nodes, srun per node  distill stage train    (accelerate, machine rank = node)
    eval     one task                                distill stage export,eval

What to submit is decided by the run directory, as for `distill run`: finished stages and shards
are skipped, so a resubmission after a failure, a cancellation or a preemption asks only for
what is missing and never samples anything twice. Jobs still queued or running from an earlier
submission (RUN/slurm/jobs.jsonl, checked against squeue) are waited for, not submitted again,
unless a job before them in the chain is submitted anew: then they are cancelled and replaced,
as are jobs left pending on a dependency that failed (Slurm's default keeps them forever).
"""

from __future__ import annotations

import json
import re
import shlex
import subprocess
import sys
import time
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path

from distill.config import Config
from distill.core.files import atomic_write_text, read_jsonl
from distill.core.rundir import RoundDir, RunDir
from distill.core.stages import Stage, round_stages, stage_named

TEMPLATES = Path(__file__).resolve().parents[1] / "launch" / "templates"
# Slurm states of a job that has not ended (squeue --states=all reports ended ones for MinJobAge).
ACTIVE_STATES = frozenset(
    {
        "PENDING",
        "RUNNING",
        "CONFIGURING",
        "COMPLETING",
        "REQUEUED",
        "RESIZING",
        "SUSPENDED",
        "REQUEUE_HOLD",
        "REQUEUE_FED",
        "SIGNALING",
        "STAGE_OUT",
        "STOPPED",
    }
)
# A pending job whose dependency failed never runs (unless the cluster cancels it itself).
NEVER = "DependencyNeverSatisfied"


@dataclass
class Job:
    """One job of the plan: the stages it runs for one round, the shards of an array job, and what it
    waits for."""

    round: int
    kind: str  # sample, ground, filter, train, eval
    stages: list[str]
    shards: list[int] | None = None  # array tasks (= shard indices); None for a single job
    after_ok: list[str] = field(default_factory=list)  # keys of jobs planned here, or ids of queued jobs
    after_any: list[str] = field(default_factory=list)  # ids of queued arrays (a task of one may have failed)
    job_id: str | None = None

    @property
    def key(self) -> str:
        return job_key(self.round, self.kind)


def job_key(round_index: int, kind: str) -> str:
    """A job's name within its run, e.g. r001-sample: what resubmissions match queued jobs by."""
    return f"r{round_index:03d}-{kind}"


def job_kinds(cfg: Config, rd: RoundDir) -> list[tuple[str, list[str]]]:
    """(kind, stages) of the jobs of round `rd`, in order, from the stage registry: consecutive
    stages of one job kind share a job, and a stage its config turns off runs in the next job."""
    kinds: list[tuple[str, list[str]]] = []
    pending: list[str] = []
    for stage in round_stages(rd.index):
        pending.append(stage.name)
        if not stage.enabled(cfg):
            continue
        if kinds and kinds[-1][0] == stage.slurm_job:
            kinds[-1][1].extend(pending)
        else:
            kinds.append((stage.slurm_job, pending))
        pending = []
    return kinds


def job_stages(job: Job) -> list[Stage]:
    """The registry entries of the stages a job runs."""
    return [stage_named(name) for name in job.stages]


@dataclass
class Queued:
    """A job from an earlier submission that has not ended: its id and the shards its live tasks cover."""

    job_id: str
    shards: set[int] | None


def queue_states(job_ids: list[str]) -> dict[str, list[tuple[str, str, str]]]:
    """Job id -> [(task, state, reason)] from squeue, for the jobs it still knows (array tasks one by one)."""
    if not job_ids:
        return {}
    try:
        done = subprocess.run(
            ["squeue", "--me", "--noheader", "--array", "--states=all", "--format=%i|%T|%r"],
            capture_output=True,
            text=True,
            timeout=60,
            check=False,
        )
    except FileNotFoundError:
        raise RuntimeError(
            "squeue not found: distill slurm needs the Slurm client commands on PATH"
        ) from None
    if done.returncode != 0:
        raise RuntimeError(f"squeue failed: {done.stderr.strip()}")
    wanted = set(job_ids)
    out: dict[str, list[tuple[str, str, str]]] = {}
    for line in done.stdout.splitlines():
        task, state, reason = (line.split("|") + ["", ""])[:3]
        job, _, index = task.partition("_")
        if job in wanted:
            out.setdefault(job, []).append((index, state, reason))
    return out


def read_jobs(run: RunDir) -> list[dict]:
    path = jobs_file(run)
    return list(read_jsonl(path)) if path.exists() else []


def jobs_file(run: RunDir) -> Path:
    return run.path / "slurm" / "jobs.jsonl"


def queued_jobs(run: RunDir) -> tuple[dict[str, list[Queued]], list[str]]:
    """(job key -> its jobs from earlier submissions still queued or running, ids of jobs left
    pending on a dependency that failed: they would never run)."""
    records = read_jobs(run)
    states = queue_states([r["job_id"] for r in records])
    live_jobs: dict[str, list[Queued]] = {}
    doomed = []
    for r in records:
        tasks = states.get(r["job_id"], [])
        if any(reason == NEVER for _, _, reason in tasks):
            doomed.append(r["job_id"])
            continue
        live = [task for task, state, _ in tasks if state in ACTIVE_STATES]
        if not live:
            continue
        shards = None
        if r.get("shards") is not None:
            # A pending array's tasks may show as one line "[1-3]": those not started are all still live.
            shards = set()
            for task in live:
                shards |= set(r["shards"]) if task.startswith("[") or task == "" else {int(task)}
        live_jobs.setdefault(r["key"], []).append(Queued(r["job_id"], shards))
    return live_jobs, doomed


@dataclass
class Plan:
    jobs: list[Job]
    # Queued jobs to cancel: they wait for a job that is being replaced, so they would run too
    # early (an array whose new shard they do not wait for) or never.
    cancel: list[str] = field(default_factory=list)


def plan(cfg: Config, run: RunDir, rounds: int, queued: dict[str, list[Queued]]) -> Plan:
    """The jobs to submit for rounds up to `rounds`, given what is on disk and what is still queued.
    A queued job is kept only while nothing before it in the chain is submitted anew."""
    first = 0 if cfg.cold_start.enabled else 1
    count = cfg.sample.num_shards
    jobs: list[Job] = []
    cancel: list[str] = []
    ok: list[str] = []  # what the next job waits for: planned keys or queued ids (afterok)
    anyway: list[str] = []  # queued arrays to wait for whatever their end (afterany)
    fresh = False  # a job has been planned anew: every queued job after it is replaced
    for index in range(first, rounds + 1):
        rd = run.round(index)
        for kind, stages in job_kinds(cfg, rd):
            if all(rd.is_done(s) for s in stages):
                continue
            live = queued.get(job_key(index, kind), [])
            if fresh and live:
                cancel += [q.job_id for q in live]
                live = []
            # An array job: a stage in it writes shards (a stage its config turns off writes none).
            sharded = [s for s in map(stage_named, stages) if s.sharded and s.enabled(cfg)]
            if sharded:
                path_of = partial(rd.shard_file, sharded[0].shard_dir)
                missing = set(rd.missing_shards(path_of, count))
                covered = set().union(*(q.shards or set() for q in live))
                # All shards on disk but the stage unmarked (its last task died just before): one
                # task finds every shard present and marks the stage.
                todo = sorted(missing - covered) or ([] if live else [0])
                next_ok, next_any = [], [q.job_id for q in live]
                if todo:
                    job = Job(index, kind, stages, todo, after_ok=list(ok), after_any=list(anyway))
                    jobs.append(job)
                    next_ok, fresh = [job.key], True
                ok, anyway = next_ok, next_any
            elif live:
                ok, anyway = [live[0].job_id], []
            else:
                job = Job(index, kind, stages, after_ok=list(ok), after_any=list(anyway))
                jobs.append(job)
                ok, anyway, fresh = [job.key], [], True
    return Plan(jobs, cancel)


def render(template: str, fields: dict[str, str], source: Path) -> str:
    """Fill the {{name}} fields of an sbatch template; a field the template names but distill
    does not know is an error (a typo would otherwise submit a broken script)."""
    unknown = sorted(set(re.findall(r"\{\{(\w+)\}\}", template)) - fields.keys())
    if unknown:
        raise ValueError(
            f"{source}: unknown template field(s) {', '.join(unknown)} (known: {', '.join(sorted(fields))})"
        )
    return re.sub(r"\{\{(\w+)\}\}", lambda m: fields[m.group(1)], template)


def sbatch_options(cfg: Config, gpus: int) -> str:
    slurm_cfg = cfg.slurm
    opts = [
        f"--partition={slurm_cfg.partition}" if slurm_cfg.partition else "",
        f"--account={slurm_cfg.account}" if slurm_cfg.account else "",
        f"--qos={slurm_cfg.qos}" if slurm_cfg.qos else "",
        f"--mem={slurm_cfg.mem}" if slurm_cfg.mem else "",
        f"--gpus-per-node={gpus}" if gpus else "",
        *slurm_cfg.extra_args,
    ]
    return "\n".join(f"#SBATCH {o}" for o in opts if o)


def script(cfg: Config, run: RunDir, job: Job) -> str:
    """The sbatch script of one job."""
    slurm_cfg = cfg.slurm
    folder = Path(slurm_cfg.template_dir) if slurm_cfg.template_dir else TEMPLATES
    stages = job_stages(job)
    multi_node = any(s.multi_node for s in stages)
    name = "train.sbatch" if multi_node else "stage.sbatch"
    python = slurm_cfg.python or sys.executable
    command = [
        python,
        "-m",
        "distill.cli",
        "stage",
        ",".join(job.stages),
        str(run.config.resolve()),
        "--round",
        str(job.round),
    ]
    shard = " sample.shard_index=$SLURM_ARRAY_TASK_ID" if job.shards is not None else ""
    logs = (run.path / "slurm" / "logs").resolve()
    fields = {
        "job_name": f"distill-{run.path.name}-{job.key}",
        "log_file": str(logs / ("%x-%A_%a.out" if job.shards is not None else "%x-%j.out")),
        "time": getattr(slurm_cfg, stages[-1].slurm_time),
        "cpus_per_task": str(slurm_cfg.cpus_per_task),
        "nodes": str(slurm_cfg.train_nodes),
        "workdir": str(Path.cwd()),
        # Training takes every GPU of its nodes; a vLLM engine (sampling, grounding, eval) runs on one.
        "sbatch_options": sbatch_options(
            cfg,
            slurm_cfg.gpus_per_node
            if multi_node
            else min(1, slurm_cfg.gpus_per_node)
            if any(s.engine and s.enabled(cfg) for s in stages)
            else 0,
        ),
        "setup": "\n".join(slurm_cfg.setup),
        "main_process_port": str(slurm_cfg.main_process_port),
        "command": shlex.join(command) + shard,
    }
    path = folder / name
    return render(path.read_text(), fields, path)


def sbatch_args(cfg: Config, job: Job, ids: dict[str, str]) -> list[str]:
    """sbatch's options for a job: its array and its dependencies (planned keys mapped to job ids)."""
    args = ["--parsable"]
    if job.shards is not None:
        throttle = f"%{cfg.slurm.array_parallel}" if cfg.slurm.array_parallel else ""
        args.append(f"--array={','.join(map(str, job.shards))}{throttle}")
    deps = [f"afterok:{ids.get(k, k)}" for k in job.after_ok] + [f"afterany:{i}" for i in job.after_any]
    if deps:
        args.append(f"--dependency={','.join(deps)}")
    return args


def describe(job: Job) -> str:
    shards = f" shards {','.join(map(str, job.shards))}" if job.shards is not None else ""
    after = [f"afterok:{k}" for k in job.after_ok] + [f"afterany:{i}" for i in job.after_any]
    return f"{job.key}: {'+'.join(job.stages)}{shards}" + (f" after {', '.join(after)}" if after else "")


def submit(cfg: Config, run: RunDir, rounds: int, dry_run: bool = False) -> list[str]:
    """Submit the missing jobs of rounds up to `rounds` (cancelling queued ones that can no longer
    run as planned); return the lines that say what was done. A dry run changes nothing."""
    queued, doomed = queued_jobs(run)  # no jobs file: nothing queued, squeue not asked
    planned = plan(cfg, run, rounds, queued)
    cancel = [*doomed, *planned.cancel]
    kept = {key: [q for q in qs if q.job_id not in cancel] for key, qs in queued.items()}
    lines = [
        f"queued from an earlier submission: {key} job {', '.join(q.job_id for q in qs)}"
        for key, qs in sorted(kept.items())
        if qs
    ]
    if cancel:
        lines.append(
            f"{'would cancel' if dry_run else 'cancelled'} job(s) {', '.join(cancel)}: they wait for jobs "
            "that failed or are being replaced"
        )
        if not dry_run:
            subprocess.run(["scancel", *cancel], capture_output=True, check=False)
    if not planned.jobs:
        return [*lines, f"slurm: nothing to submit; rounds up to {rounds} are finished or queued"]
    folder = run.path / "slurm"
    ids: dict[str, str] = {}
    stamp = time.strftime("%Y%m%d-%H%M%S")
    for job in planned.jobs:
        text = script(cfg, run, job)
        args = sbatch_args(cfg, job, ids)
        if dry_run:
            lines += [f"# {describe(job)}", f"# sbatch {shlex.join(args)} {job.key}.sbatch", text]
            continue
        (folder / "logs").mkdir(parents=True, exist_ok=True)
        path = folder / "scripts" / f"{job.key}-{stamp}.sbatch"
        atomic_write_text(path, text)
        done = subprocess.run(["sbatch", *args, str(path)], capture_output=True, text=True, check=False)
        if done.returncode != 0:
            raise RuntimeError(
                f"sbatch {path} failed: {done.stderr.strip()} (jobs submitted before it: "
                f"{', '.join(ids.values()) or 'none'}; run the same command again to continue)"
            )
        job.job_id = done.stdout.strip().split(";")[0]
        ids[job.key] = job.job_id
        with jobs_file(run).open("a") as handle:  # appended job by job: a failure midway loses nothing
            handle.write(
                json.dumps(
                    {
                        "key": job.key,
                        "job_id": job.job_id,
                        "round": job.round,
                        "kind": job.kind,
                        "stages": job.stages,
                        "shards": job.shards,
                        "script": str(path),
                        "submitted": time.time(),
                    }
                )
                + "\n"
            )
        lines.append(f"submitted {describe(job)} as job {job.job_id}")
    return lines


def jobs_status(run: RunDir) -> list[str]:
    """One line per submitted job of the run: its id and its tasks' states ('not in the queue' once
    Slurm has forgotten it; the run directory says whether it finished)."""
    records = read_jobs(run)
    if not records:
        return []
    try:
        states = queue_states([r["job_id"] for r in records])
    except RuntimeError as exc:
        return [f"slurm: {exc}"]
    lines = []
    for r in records:
        tasks = states.get(r["job_id"])
        if not tasks:
            text = "not in the queue"
        else:
            counts: dict[str, int] = {}
            for _, state, reason in tasks:
                label = state + (f" ({reason})" if state == "PENDING" and reason not in ("", "None") else "")
                counts[label] = counts.get(label, 0) + 1
            text = ", ".join(f"{n} {s}" if len(tasks) > 1 else s for s, n in sorted(counts.items()))
        shards = f" [{','.join(map(str, r['shards']))}]" if r.get("shards") is not None else ""
        lines.append(f"  slurm {r['key']}{shards}: job {r['job_id']} {text}")
    return lines
