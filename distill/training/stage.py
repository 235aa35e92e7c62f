"""The train stage of a round: the next student, trained by `accelerate launch distill/train.py`
on the round's kept traces (or, with train.init=base, the base model on every round's)."""

from __future__ import annotations

from pathlib import Path

from distill.config import Config
from distill.core.files import read_json
from distill.core.rundir import RunDir
from distill.core.stages import StageContext
from distill.training.launch import launch, machines_from_env, train_command


def train_inputs(cfg: Config, run: RunDir, index: int, model: Path) -> tuple[Path, list[Path]]:
    """The student a round trains and its data: the round's model on the round's kept traces
    (train.init=continue), or the base model on the kept traces of every round so far (=base,
    ReST-EM: each round's student starts afresh, so errors of one round do not compound)."""
    if index == 0 or cfg.train.init == "continue":
        return model, [run.round(index).filtered]
    first = 0 if cfg.cold_start.enabled else 1
    return Path(cfg.model.path), [run.round(i).filtered for i in range(first, index + 1)]


def run(ctx: StageContext) -> dict | None:
    """Train round `ctx.rd`'s student; None on a node other than the main one, which marks the stage."""
    if ctx.rd.index > 0 and ctx.cfg.rl.enabled and ctx.cfg.rl.mode == "instead_of_train":
        return {"skipped": "rl.mode=instead_of_train: the rl stage trains this round's policy"}
    ctx.engines.close()  # training needs the accelerator memory and the cores the engine holds
    cfg, rd = ctx.cfg, ctx.rd
    tcfg = cfg.cold_start.train if rd.index == 0 else cfg.train
    section = "cold_start.train" if rd.index == 0 else "train"
    student, data_files = train_inputs(cfg, ctx.run, rd.index, ctx.model)
    machines = machines_from_env()
    launch(
        train_command(tcfg, ctx.run.config, data_files, student, rd.train_dir, section, machines),
        tcfg,
        "train",
    )
    if machines.rank != 0:
        return None
    return read_json(rd.checkpoint / "train_summary.json")
