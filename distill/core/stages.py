"""The stages of a round, in order: the one registry the loop, Slurm, `distill status`, the CLI and
the run directory read.

Every stage is a function `run(ctx: StageContext) -> dict | None` in the module of its own
stage, named here as "module:function" (imported when the stage runs: the core sits below every
stage, so it names them without importing them). The function returns the stats it measured, and
the caller writes them and marks the stage done; or None when this process finished its part but
not the stage (other shards or nodes still owe theirs).

A new stage is one module with its `run` plus one entry in STAGES (in data-flow order).
"""

from __future__ import annotations

import importlib
import os
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:  # types only: the core imports nothing above it at run time
    from distill.config import Config
    from distill.core.rundir import RoundDir, RunDir
    from distill.data import Datasets
    from distill.rollout.engine import EngineCache


@dataclass
class StageContext:
    """What a stage gets: the run's config and directories, the model the round starts from, the
    run's data splits and the engine cache shared by the stages of one process."""

    cfg: Config
    run: RunDir
    rd: RoundDir
    model: Path
    data: Datasets
    engines: EngineCache


@dataclass(frozen=True)
class Stage:
    name: str
    # "module:function" of its `run(ctx) -> dict | None`.
    run: str
    # What it reads and writes, relative to the round directory (the run directory's contract).
    reads: tuple[str, ...]
    writes: tuple[str, ...]
    summary: str
    # Written in shards (one file each under this folder of the round) that array tasks write on their own.
    shard_dir: str = ""
    # Runs on the round's vLLM engine.
    engine: bool = False
    # Runs as `accelerate launch` processes, across the nodes of one job.
    multi_node: bool = False
    # Part of round 0, the cold start (which samples nothing: it trains on reference traces).
    cold_start: bool = True
    # Config key (dotted) that, when false, turns the stage into a marker with no work: it then
    # runs in the next stage's Slurm job instead of a job of its own.
    enabled_by: str = ""
    # The Slurm job it runs in (consecutive stages of one job kind share a job) and the
    # SlurmConfig key of that job's time limit.
    slurm_job: str = ""
    slurm_time: str = ""
    # What `distill status` reads while it runs: "shards" (files done of shard_dir) or "steps"
    # (the trainer's log).
    progress: str = ""

    @property
    def sharded(self) -> bool:
        return bool(self.shard_dir)

    def function(self) -> Callable[[StageContext], dict | None]:
        module, _, name = self.run.partition(":")
        return getattr(importlib.import_module(module), name)

    def enabled(self, cfg: Config) -> bool:
        value: object = cfg
        for part in self.enabled_by.split(".") if self.enabled_by else ():
            value = getattr(value, part)
        return bool(value)


STAGES: tuple[Stage, ...] = (
    Stage(
        "sample",
        "distill.rollout.sample:run",
        reads=("../data/train.jsonl",),
        writes=("samples/",),
        summary="n traces per (audio, question) from the round's model",
        shard_dir="samples",
        engine=True,
        cold_start=False,
        slurm_job="sample",
        slurm_time="time_sample",
        progress="shards",
    ),
    Stage(
        "ground",
        "distill.grounding.stage:run",
        reads=("samples/",),
        writes=("grounding/",),
        summary="counterfactual probes per item, audio dependence per trace",
        shard_dir="grounding",
        engine=True,
        cold_start=False,
        enabled_by="grounding.enabled",
        slurm_job="ground",
        slurm_time="time_sample",
        progress="shards",
    ),
    Stage(
        "filter",
        "distill.filter.stage:run",
        reads=("samples/", "grounding/"),
        writes=("filtered.jsonl", "rejected.jsonl", "set_aside.json"),
        summary="checks with reason codes, pass-rate band, selection per prompt (round 0: reference traces)",
        slurm_job="filter",
        slurm_time="time_filter",
    ),
    Stage(
        "train",
        "distill.training.stage:run",
        reads=("filtered.jsonl",),
        writes=("train/",),
        summary="SFT of the next student (accelerate launch distill/train.py, DeepSpeed ZeRO)",
        multi_node=True,
        slurm_job="train",
        slurm_time="time_train",
        progress="steps",
    ),
    Stage(
        "rl",
        "distill.rl.stage:run",
        reads=("samples/", "train/final/"),
        writes=("rl/",),
        summary="on-policy GRPO on the prompts solved only sometimes (accelerate launch distill/rl_train.py)",
        multi_node=True,
        cold_start=False,
        enabled_by="rl.enabled",
        slurm_job="train",
        slurm_time="time_train",
        progress="steps",
    ),
    Stage(
        "export",
        "distill.export.stage:run",
        reads=("train/final/", "rl/final/"),
        writes=("model/",),
        summary="the checkpoint as a vLLM-loadable model, gated on vLLM agreeing with transformers",
        engine=True,
        slurm_job="eval",
        slurm_time="time_eval",
    ),
    Stage(
        "eval",
        "distill.eval.stage:run",
        reads=("model/", "../data/eval.jsonl"),
        writes=("eval.json",),
        summary="held-out accuracy, pass@k, thinking budgets, grounding gap",
        engine=True,
        slurm_job="eval",
        slurm_time="time_eval",
    ),
)
BY_NAME = {stage.name: stage for stage in STAGES}
STAGE_NAMES = tuple(BY_NAME)


def stage_named(name: str) -> Stage:
    if name not in BY_NAME:
        raise ValueError(f"unknown stage {name!r} (known: {', '.join(STAGE_NAMES)})")
    return BY_NAME[name]


def round_stages(index: int) -> tuple[Stage, ...]:
    """The stages of round `index`: round 0, the cold start, samples nothing."""
    return tuple(s for s in STAGES if index > 0 or s.cold_start)


def shard_plan(cfg: Config) -> tuple[int, list[int]]:
    """(shard count, shard indices this process samples): sample.shard_index, else the Slurm array
    task (an array of sample.num_shards tasks, any first index), else all shards."""
    count, index = cfg.sample.num_shards, cfg.sample.shard_index
    if index < 0 and "SLURM_ARRAY_TASK_ID" in os.environ:
        slurm_count = int(os.environ.get("SLURM_ARRAY_TASK_COUNT", count))
        if slurm_count != count:
            raise ValueError(
                f"Slurm array has {slurm_count} tasks but sample.num_shards={count}; "
                "submit one array task per shard"
            )
        index = int(os.environ["SLURM_ARRAY_TASK_ID"]) - int(os.environ.get("SLURM_ARRAY_TASK_MIN", 0))
        if not 0 <= index < count:
            raise ValueError(f"SLURM_ARRAY_TASK_ID gives shard {index}, outside [0, {count})")
    return count, (list(range(count)) if index < 0 else [index])
