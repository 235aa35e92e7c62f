"""The run directory: the contract between stages, shards and jobs.

    <output_dir>/<run_name>/
      config.yaml               resolved config of the run
      data/                     train.jsonl, eval.jsonl (+ audio/ for synthetic items)
      base_model/               the tiny model, when the config builds one
      metrics.jsonl             one line per finished round, rebuilt from the rounds' stats
      round_000/                cold start: SFT on the items' reference traces
      round_001/
        samples/shard-00000-of-00004.jsonl
        grounding/shard-00000-of-00004.jsonl   per item: counterfactual probes, per-trace audio dependence
        filtered.jsonl          kept traces (SFT rows with lineage and check results)
        rejected.jsonl          every rejected trace with its reasons
        set_aside.json          ids of prompts every sample failed / solved
        train/final/            trainer output (full checkpoint)
        rl/                     the rl stage (rl.enabled): band.json, log.jsonl, rollouts/, final/
        model/                  exported, vLLM-loadable model
        eval.json               held-out accuracy
        stats/<stage>.json      what each finished stage measured (counts, seconds)
        STAGE                   the last finished stage
        pushed.txt              where the round went on the HF Hub (hub.repo_id set)

A stage is finished when STAGE says so; its stats file is written before STAGE, so a finished
stage always has its numbers. Re-running does only what is not finished.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

from distill.core.files import atomic_write_json, atomic_write_text, read_json
from distill.core.stages import STAGE_NAMES, round_stages


class StageOrderError(RuntimeError):
    """A stage was asked to run before the stage it reads from has finished."""


class RoundDir:
    def __init__(self, run_dir: Path, index: int):
        self.index = index
        self.path = run_dir / f"round_{index:03d}"

    samples_dir = property(lambda self: self.path / "samples")
    grounding_dir = property(lambda self: self.path / "grounding")
    filtered = property(lambda self: self.path / "filtered.jsonl")
    rejected = property(lambda self: self.path / "rejected.jsonl")
    set_aside = property(lambda self: self.path / "set_aside.json")
    train_dir = property(lambda self: self.path / "train")
    checkpoint = property(lambda self: self.path / "train" / "final")
    rl_dir = property(lambda self: self.path / "rl")
    model_dir = property(lambda self: self.path / "model")
    eval_json = property(lambda self: self.path / "eval.json")
    stats_dir = property(lambda self: self.path / "stats")
    stage_file = property(lambda self: self.path / "STAGE")
    pushed = property(lambda self: self.path / "pushed.txt")

    @property
    def policy(self) -> Path:
        """The checkpoint the round ends with, which the export reads: the rl stage's policy when it
        made one, else the SFT student."""
        rl = self.rl_dir / "final"
        return rl if rl.exists() else self.checkpoint

    def shard_file(self, shard_dir: str, shard: int, count: int) -> Path:
        """One shard file of a sharded stage (its registry entry's shard_dir)."""
        return self.path / shard_dir / f"shard-{shard:05d}-of-{count:05d}.jsonl"

    def shard_path(self, shard: int, count: int) -> Path:
        return self.shard_file("samples", shard, count)

    def grounding_path(self, shard: int, count: int) -> Path:
        return self.shard_file("grounding", shard, count)

    @staticmethod
    def missing_shards(
        path_of: Callable[[int, int], Path], count: int, shards: list[int] | None = None
    ) -> list[int]:
        """The shards (all `count`, or just `shards`) whose file `path_of(shard, count)` is not on
        disk: rd.shard_path for samples, rd.grounding_path for grounding."""
        return [i for i in (range(count) if shards is None else shards) if not path_of(i, count).exists()]

    def last_stage(self) -> str | None:
        if not self.stage_file.exists():
            return None
        stage = self.stage_file.read_text().strip()
        if stage not in STAGE_NAMES:
            raise ValueError(f"{self.stage_file}: unknown stage {stage!r} (expected one of {STAGE_NAMES})")
        return stage

    def is_done(self, stage: str) -> bool:
        last = self.last_stage()
        return last is not None and STAGE_NAMES.index(stage) <= STAGE_NAMES.index(last)

    @property
    def stages(self) -> tuple[str, ...]:
        """This round's stages: round 0, the cold start, trains on reference traces and samples nothing."""
        return tuple(stage.name for stage in round_stages(self.index))

    def require_before(self, stage: str) -> None:
        """Raise unless `stage` belongs to this round and the stage before it is finished."""
        if stage not in self.stages:
            raise StageOrderError(
                f"round {self.index} has no {stage!r} stage (its stages: {', '.join(self.stages)})"
            )
        i = self.stages.index(stage)
        if i > 0 and not self.is_done(self.stages[i - 1]):
            raise StageOrderError(
                f"{self.path}: stage {stage!r} needs {self.stages[i - 1]!r} finished first "
                f"(last finished: {self.last_stage()!r})"
            )

    def mark_done(self, stage: str, stats: dict) -> None:
        """Record a finished stage: its stats first, then the marker. A stage already counted as done
        (a late array task) changes nothing, so the marker never moves backwards."""
        if self.is_done(stage):
            return
        atomic_write_json(self.stats_dir / f"{stage}.json", stats)
        atomic_write_text(self.stage_file, stage + "\n")

    def stats(self) -> dict[str, dict]:
        return {
            s: read_json(self.stats_dir / f"{s}.json")
            for s in STAGE_NAMES
            if (self.stats_dir / f"{s}.json").exists()
        }


class RunDir:
    def __init__(self, path: str | Path):
        self.path = Path(path)

    config = property(lambda self: self.path / "config.yaml")
    data_dir = property(lambda self: self.path / "data")
    metrics = property(lambda self: self.path / "metrics.jsonl")

    def round(self, index: int) -> RoundDir:
        return RoundDir(self.path, index)

    def rounds(self) -> list[RoundDir]:
        return [RoundDir(self.path, int(p.name[6:])) for p in sorted(self.path.glob("round_[0-9][0-9][0-9]"))]
