"""The rl stage of a round: on-policy GRPO on the questions the round's model solves only
sometimes, run by `accelerate launch distill/rl_train.py` (DeepSpeed ZeRO, a vLLM engine beside
each rank), from the round's SFT student (rl.mode=after_train) or from the round's own model
(=instead_of_train, when the round trains no student).

The band (rl.band right answers among the round's sample.n traces, the filter's answer check) is
written to rl/band.json before the trainer starts: the run directory is the trainer's only input.
An empty band ends the stage with a message; by rl.on_empty_band the round goes on without RL
("skip") or stops ("fail")."""

from __future__ import annotations

import os
import shutil
import socket
from pathlib import Path

from distill.config import Config
from distill.core.files import atomic_write_json, read_json
from distill.core.rows import read_samples
from distill.core.rundir import RoundDir
from distill.core.stages import StageContext
from distill.grounding.counterfactual import swap_partners
from distill.models.tokens import control_tokens
from distill.rl.prompts import EmptyBandError, band_items, pass_counts
from distill.rl.rewards import Rewards
from distill.training.launch import Machines, accelerate_command, launch, machines_from_env

RL_SCRIPT = Path(__file__).resolve().parents[1] / "rl_train.py"
# The weights and model config a skipped instead_of_train stage hands on unchanged.
MODEL_FILES = ("*.safetensors", "*.safetensors.index.json", "config.json", "generation_config.json")


class EmptyBandStop(RuntimeError):
    """rl.on_empty_band=fail and the round has no item in the band."""


def start_model(cfg: Config, rd: RoundDir, round_model: Path) -> Path:
    """The policy RL starts from: the round's SFT student (made loadable as rl/start), or the
    round's own model."""
    if cfg.rl.mode == "instead_of_train":
        return round_model
    start = rd.rl_dir / "start"
    if not start.exists():
        loadable(rd.checkpoint, Path(cfg.model.path), start)
    return start


def loadable(checkpoint: Path, processor_source: Path, dest: Path) -> None:
    """A model folder vLLM and transformers load: the trainer's checkpoint (its weights linked, not
    copied) with the processor files of `processor_source`, which the trainer does not write."""
    from transformers import AutoProcessor

    from distill.models.registry import family_of

    family_of(processor_source)  # a CPU install's processor may need the family's import hooks
    tmp = private_tmp(dest)
    AutoProcessor.from_pretrained(processor_source).save_pretrained(tmp)
    for pattern in MODEL_FILES:
        for src in checkpoint.glob(pattern):
            (tmp / src.name).unlink(missing_ok=True)
            if src.suffix == ".safetensors":
                (tmp / src.name).symlink_to(src.resolve())
            else:
                shutil.copy2(src, tmp / src.name)
    publish(tmp, dest)


def private_tmp(dest: Path) -> Path:
    """An empty folder beside `dest` that only this process writes: on Slurm every node of the job
    runs the stage and builds the same folder."""
    tmp = dest.with_name(f".{dest.name}.{socket.gethostname()}.{os.getpid()}.tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    return tmp


def publish(tmp: Path, dest: Path) -> None:
    """Move a finished folder into place; another node's identical one may have got there first."""
    try:
        tmp.rename(dest)
    except OSError:
        if not dest.exists():
            raise
        shutil.rmtree(tmp, ignore_errors=True)


def write_band(cfg: Config, rd: RoundDir, items: list, model_dir: Path) -> dict:
    """rl/band.json: the band's items (as the trainer reads them), their swap partners (the
    grounding term's counterfactual) and every item's pass count; EmptyBandError if none."""
    rewards = Rewards(cfg.rl, cfg.filter, control_tokens(str(model_dir)))
    counts = pass_counts(read_samples(rd, cfg.sample.num_shards), rewards.right)
    band = band_items(counts, list(cfg.rl.band))
    by_id = {it.id: it for it in items}
    partners = swap_partners(items, cfg.seed)
    record = {
        "band": list(cfg.rl.band),
        "items": [by_id[i].to_json() for i in band],
        "partners": {i: partners[i].to_json() for i in band if i in partners},
        "pass_counts": {i: list(c) for i, c in sorted(counts.items())},
    }
    atomic_write_json(rd.rl_dir / "band.json", record)
    return record


def skip(cfg: Config, rd: RoundDir, round_model: Path, message: str) -> dict:
    """The round goes on without RL: after SFT, the student stands; instead of it, the round's
    model is handed on unchanged (as rl/final, which the export reads)."""
    print(f"rl: {message}; the round goes on without RL (rl.on_empty_band=skip)", flush=True)
    if cfg.rl.mode == "instead_of_train":
        tmp = private_tmp(rd.rl_dir / "final")
        for pattern in MODEL_FILES:
            for src in round_model.glob(pattern):
                shutil.copy2(src, tmp / src.name)
        atomic_write_json(tmp / "rl_summary.json", {"skipped": message, "steps": 0})
        publish(tmp, rd.rl_dir / "final")
    return {"skipped": message, "steps": 0}


def rl_command(cfg: Config, config_path: Path, model: Path, rd: RoundDir, machines: Machines) -> list[str]:
    """The accelerate command line of the stage (what a user would type)."""
    args = [
        "--config",
        str(config_path),
        "--model",
        str(model),
        "--round",
        str(rd.index),
        "--out",
        str(rd.rl_dir),
    ]
    return accelerate_command(cfg.train, "train", RL_SCRIPT, args, machines)


def run(ctx: StageContext) -> dict | None:
    """RL of round `ctx.rd`; None on a node other than the main one, which marks the stage."""
    cfg, rd = ctx.cfg, ctx.rd
    if not cfg.rl.enabled:
        return {"enabled": False}
    ctx.engines.close()  # the trainer's ranks open engines of their own
    final = rd.rl_dir / "final"
    if final.exists() and not (rd.rl_dir / "band.json").exists():
        return read_json(final / "rl_summary.json")  # a skip handed the model on; the marker was not set
    if not final.exists() and not (rd.rl_dir / "band.json").exists():
        try:
            write_band(cfg, rd, ctx.data.train, ctx.model)  # the round's tokenizer: the student's
        except EmptyBandError as exc:
            if cfg.rl.on_empty_band == "fail":
                raise EmptyBandStop(f"{exc} (rl.on_empty_band=fail)") from exc
            return skip(cfg, rd, ctx.model, str(exc))
    model = start_model(cfg, rd, ctx.model)
    machines = machines_from_env()
    if not final.exists():  # else a kill came after the trainer saved it, before the marker
        launch(rl_command(cfg, ctx.run.config, model, rd, machines), cfg.train, "rl")
    if machines.rank != 0:
        return None
    summary = read_json(final / "rl_summary.json")
    band = read_json(rd.rl_dir / "band.json")
    return {**summary, "band": band["band"], "band_items": len(band["items"])}
