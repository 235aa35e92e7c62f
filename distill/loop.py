"""The round loop: cold start, then rounds of sample -> ground -> filter -> train -> export -> eval.

Each stage is a function from the files of the previous stage to its own files; the loop only
decides what is left to do by looking at the run directory, so re-running the same command after
an interruption finishes the run without redoing finished stages or shards.
"""

from __future__ import annotations

import time
from dataclasses import replace
from pathlib import Path

from omegaconf import OmegaConf

from distill.config import Config, config_diff, load_config, resumable, to_yaml
from distill.core.files import atomic_write_json, atomic_write_text
from distill.core.locks import RUN_UNIT, unit_lock, unit_locks
from distill.core.rundir import RoundDir, RunDir, StageOrderError
from distill.core.schema import ConfigError
from distill.core.stages import Stage, StageContext, shard_plan, stage_named
from distill.data import Datasets, check_model_audio, max_audio_items, prepare_data
from distill.eval.stage import eval_stage
from distill.export.hub import push_round
from distill.models.registry import build_tiny_model, check_model_dir, family_named
from distill.report.metrics import WandbLogger, format_table, round_record, write_run_metrics
from distill.rollout.engine import EngineCache
from distill.training.launch import machines_from_env


def init_run_dir(cfg: Config, run: RunDir) -> Datasets:
    """Check a resumed run's config, build the base model and the data if needed, then save the
    resolved config. The config is saved last, so a set-up that fails (a wrong path, a bad
    manifest) can be corrected and re-run without being refused as a changed config."""
    check_resume(cfg, run)
    model = ensure_base_model(cfg)
    check_model_dir(model)
    check_model_audio(cfg, model)
    data = prepare_data(cfg, run.data_dir)
    # The run's config, not one process's part in it: an array task's shard index stays out.
    atomic_write_text(run.config, to_yaml(replace(cfg, sample=replace(cfg.sample, shard_index=-1))))
    return data


def check_resume(cfg: Config, run: RunDir) -> None:
    """On resume, refuse config changes that would invalidate finished work."""
    if run.config.exists():
        saved = load_config(run.config)
        changed = [k for k in config_diff(saved, cfg) if not resumable(k)]
        if changed:
            raise ConfigError(
                f"{run.config}: this run was started with a different config; "
                f"changed key(s): {', '.join(changed)}. "
                "Use a new run_name, or revert those keys to resume."
            )


def ensure_base_model(cfg: Config) -> Path:
    path = Path(cfg.model.path)
    if not (path / "config.json").exists():
        if not cfg.model.build_tiny:
            raise FileNotFoundError(
                f"model.path={path}: no model there (set model.build_tiny=true for a tiny one)"
            )
        print(f"model: building a tiny random {family_named(cfg.model.tiny.family).title} at {path}")
        build_tiny_model(path, cfg.model.tiny)
    return path


def input_model(cfg: Config, run: RunDir, index: int) -> Path:
    """The model a round starts from: the previous round's export (or the base model)."""
    if index == 0 or (index == 1 and not cfg.cold_start.enabled):
        return Path(cfg.model.path)
    prev = run.round(index - 1)
    if not prev.is_done("export"):
        raise RuntimeError(
            f"round {index} needs round {index - 1}'s exported model, but {prev.path} is at "
            f"stage {prev.last_stage()!r}"
        )
    return prev.model_dir


def stage_part(cfg: Config, name: str) -> str | None:
    """The part of stage `name` this process writes, which it locks on its own: one shard of a
    sharded stage (an array task's), one node of a multi-node job; None: the whole stage."""
    stage = stage_named(name)
    if stage.sharded:
        count, indices = shard_plan(cfg)
        return f"shard-{indices[0]:05d}-of-{count:05d}" if len(indices) < count else None
    machines = machines_from_env()
    if stage.multi_node and machines.count > 1:
        return f"node-{machines.rank}-of-{machines.count}"
    return None


def run_stage(cfg: Config, run: RunDir, index: int, stage: str, data: Datasets, engines: EngineCache) -> bool:
    """Run one stage of one round unless it is done; True when the stage is (now) finished. The
    stage (or this process's part of it) is locked while it runs: a second writer is refused."""
    rd = run.round(index)
    rd.require_before(stage)
    if rd.is_done(stage):
        return True
    rd.path.mkdir(parents=True, exist_ok=True)
    with unit_locks(run.path, f"{rd.path.name}.{stage}", stage_part(cfg, stage)):
        if rd.is_done(stage):  # finished by the holder this process found gone
            return True
        return execute_stage(cfg, run, rd, stage_named(stage), data, engines)


def execute_stage(
    cfg: Config, run: RunDir, rd: RoundDir, stage: Stage, data: Datasets, engines: EngineCache
) -> bool:
    """The work of one stage, then its stats and marker; False while other shards or nodes owe their part."""
    start = time.time()
    print(f"\n== round {rd.index}: {stage.name} ==", flush=True)
    ctx = StageContext(cfg, run, rd, input_model(cfg, run, rd.index), data, engines)
    stats = stage.function()(ctx)
    if stats is None:
        return False
    rd.mark_done(stage.name, {**stats, "seconds": round(time.time() - start, 2)})
    return True


def evaluate_round(cfg: Config, run: RunDir, index: int) -> dict:
    """`distill eval ROUND_DIR`: (re-)evaluate a round's exported model with `cfg`'s eval settings;
    its eval.json, stats and the run's metrics are rewritten. The round must have passed export."""
    rd = run.round(index)
    if not rd.is_done("export"):
        raise StageOrderError(
            f"{rd.path}: eval needs the exported model (last finished stage: {rd.last_stage()!r})"
        )
    with unit_lock(run.path, RUN_UNIT, exclusive=False), unit_lock(run.path, f"{rd.path.name}.eval"):
        data = prepare_data(cfg, run.data_dir)
        start = time.time()
        with EngineCache(cfg.engine, cfg.seed, max_audio_items(cfg.data)) as engines:
            stats = eval_stage(cfg, data.eval, rd.model_dir, rd, engines.get, data.benchmarks)
        stats = {**stats, "seconds": round(time.time() - start, 2)}
        if rd.is_done("eval"):
            atomic_write_json(rd.stats_dir / "eval.json", stats)
        else:
            rd.mark_done("eval", stats)
        write_run_metrics(run)
    return stats


def export_round(cfg: Config, run: RunDir, index: int) -> dict:
    """`distill export ROUND_DIR`: the round's export stage as the loop runs it (its model
    directory, the gate, the model card), unless the round is exported already; its stats."""
    rd = run.round(index)
    if rd.is_done("export"):
        print(f"export: {rd.model_dir} is exported already (the gate passed); nothing to do", flush=True)
    else:
        with unit_lock(run.path, RUN_UNIT, exclusive=False):
            data = prepare_data(cfg, run.data_dir)
            with EngineCache(cfg.engine, cfg.seed, max_audio_items(cfg.data)) as engines:
                # A stage between train and export that the config turns off (rl) is only its marker.
                for name in rd.stages[: rd.stages.index("export")]:
                    stage = stage_named(name)
                    if stage.enabled_by and not stage.enabled(cfg) and not rd.is_done(name):
                        run_stage(cfg, run, index, name, data, engines)
                run_stage(cfg, run, index, "export", data, engines)
    return rd.stats()["export"]


def run_round(cfg: Config, run: RunDir, index: int, data: Datasets, engines: EngineCache) -> RoundDir:
    for stage in run.round(index).stages:
        if not run_stage(cfg, run, index, stage, data, engines):
            raise RuntimeError(f"round {index}: stage {stage} is waiting for other shards or nodes")
    return run.round(index)


def wandb_logger(cfg: Config, run: RunDir) -> WandbLogger:
    return WandbLogger(
        run, cfg.wandb.mode, cfg.wandb.project, config=OmegaConf.to_container(OmegaConf.structured(cfg))
    )


def finish_round(cfg: Config, run: RunDir, rd: RoundDir, logger: WandbLogger | None = None) -> None:
    """After a round's eval: the run's metrics, the round in wandb (once), the push to the hub
    (once). The loop calls it, and so does the job that runs a round's eval on Slurm."""
    write_run_metrics(run)
    own = logger is None
    logger = logger or wandb_logger(cfg, run)
    try:
        logger.log_round(rd, round_record(rd), run)
    finally:
        if own:
            logger.finish()
    if cfg.hub.repo_id and not rd.pushed.exists():
        pushed = push_round(rd, cfg.hub.repo_id, cfg.hub.dataset_repo_id, cfg.hub.private)
        atomic_write_text(rd.pushed, "\n".join(pushed) + "\n")
        print("\n".join(f"pushed {line}" for line in pushed), flush=True)


def run_stages(cfg: Config, index: int, stages: list[str]) -> bool:
    """`distill stage STAGES --round N` (a Slurm job's work): the stages in order on one engine,
    beside other jobs of the run (each stage or shard locked on its own); False when a stage waits
    for other shards. A round whose eval finished here is finished as the loop would."""
    run = RunDir(cfg.run_dir)
    with unit_lock(run.path, RUN_UNIT, exclusive=False):
        data = init_run_dir(cfg, run)
        with EngineCache(cfg.engine, cfg.seed, max_audio_items(cfg.data)) as engines:
            for stage in stages:
                done = run_stage(cfg, run, index, stage, data, engines)
                print(
                    f"round {index} {stage}: "
                    f"{'done' if done else 'this part done; other shards or nodes owe theirs'}"
                )
                if not done:
                    return False
        if "eval" in stages:
            finish_round(cfg, run, run.round(index))
    return True


def run_loop(cfg: Config) -> list[dict]:
    """Run (or resume) the whole loop; return the per-round metric records. The run is locked
    while it runs: a second `distill run` (or a stage job) on it is refused."""
    run = RunDir(cfg.run_dir)
    with unit_lock(run.path, RUN_UNIT):
        data = init_run_dir(cfg, run)
        logger = wandb_logger(cfg, run)
        first = 0 if cfg.cold_start.enabled else 1
        try:
            with EngineCache(cfg.engine, cfg.seed, max_audio_items(cfg.data)) as engines:
                for index in range(first, cfg.loop.rounds + 1):
                    rd = run_round(cfg, run, index, data, engines)
                    finish_round(cfg, run, rd, logger)
        finally:
            logger.finish()
        records = write_run_metrics(run)
    print("\n" + format_table(records), flush=True)
    return records
