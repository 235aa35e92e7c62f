"""The configuration of a run: every section assembled into one schema (OmegaConf structured
dataclasses), loaded, checked and compared.

A run is configured by a YAML preset (configs/*.yaml) plus `key=value` overrides. Unknown keys
and values of the wrong type fail in `load_config`, before any work starts, naming the key.
Each section lives beside the code it configures, with the checks of its own values (its
`config.py`: data_pipelines, models, rollout, grounding, filter, training, rl, export, eval); this
module adds the loop, wandb and Slurm sections and the checks that span sections.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from omegaconf import MISSING, DictConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException

from data_pipelines.config import RESUMABLE as DATA_RESUMABLE
from data_pipelines.config import DataConfig
from data_pipelines.config import validate as validate_data
from distill.core.schema import ConfigError, check_choices, check_non_negative, check_positive
from distill.eval.config import EvalConfig
from distill.eval.config import validate as validate_eval
from distill.export.config import ExportConfig, HubConfig
from distill.export.config import validate as validate_export
from distill.filter.config import RESUMABLE as FILTER_RESUMABLE
from distill.filter.config import FilterConfig
from distill.filter.config import validate as validate_filter
from distill.grounding.config import RESUMABLE as GROUNDING_RESUMABLE
from distill.grounding.config import GroundingConfig
from distill.grounding.config import validate as validate_grounding
from distill.models.config import ModelConfig
from distill.models.config import validate as validate_model
from distill.rl.config import RESUMABLE as RL_RESUMABLE
from distill.rl.config import RLConfig, validate_rl
from distill.rollout.config import RESUMABLE as SAMPLE_RESUMABLE
from distill.rollout.config import EngineConfig, SampleConfig, validate_engine, validate_sample
from distill.training.config import RESUMABLE as TRAIN_RESUMABLE
from distill.training.config import ColdStartConfig, TrainConfig, validate_cold_start, validate_train


@dataclass
class SlurmConfig:
    """`distill slurm submit`: per round a sampling job array (one shard per task), a grounding
    array, a filter job, a multi-node training job and an export+eval job, chained with afterok."""

    partition: str = ""
    account: str = ""
    qos: str = ""
    # GPUs per node for the sampling, grounding, training and eval jobs (0: CPU only).
    gpus_per_node: int = 0
    cpus_per_task: int = 4
    # Memory per node, e.g. "64G" ("": the partition's default).
    mem: str = ""
    # Nodes of the training job; train.num_processes counts the processes of all of them.
    train_nodes: int = 1
    time_sample: str = "04:00:00"
    time_filter: str = "01:00:00"
    time_train: str = "12:00:00"
    time_eval: str = "02:00:00"
    # Shell lines every job runs first (module load ..., source .venv/bin/activate).
    setup: list[str] = field(default_factory=list)
    # Extra sbatch options for every job, e.g. ["--constraint=h100", "--exclusive"].
    extra_args: list[str] = field(default_factory=list)
    # At most this many array tasks at once (0: no limit).
    array_parallel: int = 0
    # Folder with your own stage.sbatch / train.sbatch (default: the ones in launch/templates/).
    template_dir: str = ""
    # The Python the jobs run distill with (default: the one that submits).
    python: str = ""
    # Port of the training job's main process (plus the job id modulo 1000, so jobs do not collide).
    main_process_port: int = 29500


@dataclass
class LoopConfig:
    rounds: int = 2


@dataclass
class WandbConfig:
    mode: str = "offline"
    project: str = "distill"


@dataclass
class Config:
    run_name: str = MISSING
    output_dir: str = "checkpoints"
    seed: int = 0
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    engine: EngineConfig = field(default_factory=EngineConfig)
    sample: SampleConfig = field(default_factory=SampleConfig)
    grounding: GroundingConfig = field(default_factory=GroundingConfig)
    filter: FilterConfig = field(default_factory=FilterConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    cold_start: ColdStartConfig = field(default_factory=ColdStartConfig)
    rl: RLConfig = field(default_factory=RLConfig)
    export: ExportConfig = field(default_factory=ExportConfig)
    hub: HubConfig = field(default_factory=HubConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    loop: LoopConfig = field(default_factory=LoopConfig)
    wandb: WandbConfig = field(default_factory=WandbConfig)
    slurm: SlurmConfig = field(default_factory=SlurmConfig)

    @property
    def run_dir(self) -> Path:
        return Path(self.output_dir) / self.run_name


def load_config(path: str | Path | None, overrides: list[str] | tuple[str, ...] = ()) -> Config:
    """Merge the schema, a YAML preset and `key=value` overrides; validate; return a typed Config.

    Raises ConfigError naming the offending key for unknown keys, wrong types and bad values.
    """
    merged = _merged(path, overrides)
    missing = sorted(OmegaConf.missing_keys(merged))
    if missing:
        raise ConfigError(f"missing required key(s): {', '.join(missing)}")
    cfg: Config = _to_object(merged)
    _validate(cfg)
    return cfg


def load_data_config(path: str | Path | None, overrides: list[str] | tuple[str, ...] = ()) -> DataConfig:
    """The `data` section alone, checked like load_config checks it (for `distill data`, which
    needs no run name or model)."""
    data: DataConfig = _to_object(_merged(path, overrides).data)
    validate_data(data)
    return data


def _validate(cfg: Config) -> None:
    """Each section's own checks, in the schema's order, then the checks between sections."""
    validate_model(cfg.model)
    validate_data(cfg.data)
    validate_engine(cfg.engine)
    validate_sample(cfg.sample)
    validate_grounding(cfg.grounding)
    validate_filter(cfg.filter)
    validate_train("train", cfg.train)
    validate_cold_start(cfg.cold_start)
    validate_rl(cfg.rl, cfg.sample.n)
    validate_export(cfg.export)
    validate_eval(cfg.eval)
    check_positive("loop", cfg.loop, ("rounds",))
    check_choices("wandb", cfg.wandb, {"mode": ("offline", "online", "disabled")})
    _validate_slurm(cfg.slurm)

    max_model_len = cfg.engine.max_model_len
    if cfg.sample.backend == "server" and cfg.grounding.enabled:
        raise ConfigError(
            "sample.backend=server with grounding.enabled: grounding scores traces with the round's "
            "model in an offline vLLM engine, which a served-only model does not have; set "
            "grounding.enabled=false"
        )
    if cfg.rl.enabled:
        _validate_rl_run(cfg)
    for section, tcfg in (("train", cfg.train), ("cold_start.train", cfg.cold_start.train)):
        if tcfg.max_seq_len < max_model_len:
            # A sampled trace fills up to max_model_len; a shorter training window would cut it.
            raise ConfigError(
                f"{section}.max_seq_len={tcfg.max_seq_len}: must be >= engine.max_model_len={max_model_len}"
            )
        if tcfg.num_processes % cfg.slurm.train_nodes:
            raise ConfigError(
                f"{section}.num_processes={tcfg.num_processes}: must be a multiple of "
                f"slurm.train_nodes={cfg.slurm.train_nodes} (the same number of processes on every "
                "node)"
            )
    for key, tokens in (
        ("sample.max_tokens", cfg.sample.max_tokens),
        ("eval.max_tokens", cfg.eval.max_tokens),
    ):
        if tokens >= max_model_len:
            raise ConfigError(
                f"{key}={tokens}: must be below engine.max_model_len={max_model_len}, which also holds "
                "the prompt and audio tokens"
            )
    if cfg.grounding.enabled and cfg.grounding.probe_max_tokens >= max_model_len:
        raise ConfigError(
            f"grounding.probe_max_tokens={cfg.grounding.probe_max_tokens}: must be below "
            f"engine.max_model_len={max_model_len}"
        )
    answered = cfg.eval.max_tokens + cfg.eval.answer_max_tokens
    if answered >= max_model_len:
        raise ConfigError(
            f"eval.max_tokens + eval.answer_max_tokens = {answered}: must be below "
            f"engine.max_model_len={max_model_len} (a budget-cut trace is answered after its reasoning)"
        )
    if cfg.sample.skip_solved and "correct" not in cfg.filter.checks:
        raise ConfigError(
            "sample.skip_solved: needs the 'correct' check in filter.checks (it decides what is solved)"
        )


def _validate_rl_run(cfg: Config) -> None:
    """What the rl stage needs of the other sections: it runs under train's processes and its
    samples are the engine's."""
    r = cfg.rl
    if r.prompts_per_step % cfg.train.num_processes:
        raise ConfigError(
            f"rl.prompts_per_step={r.prompts_per_step}: must be a multiple of "
            f"train.num_processes={cfg.train.num_processes} (each rank samples its share)"
        )
    if cfg.sample.backend == "server":
        raise ConfigError(
            "rl.enabled with sample.backend=server: RL samples from the policy it trains, on an "
            "engine beside the trainer; set sample.backend=engine"
        )
    if r.max_response_tokens >= cfg.engine.max_model_len:
        raise ConfigError(
            f"rl.max_response_tokens={r.max_response_tokens}: must leave room for the prompt in "
            f"engine.max_model_len={cfg.engine.max_model_len}"
        )


def _validate_slurm(sl: SlurmConfig) -> None:
    check_positive("slurm", sl, ("cpus_per_task", "train_nodes", "main_process_port"))
    check_non_negative("slurm", sl, ("gpus_per_node", "array_parallel"))
    for key in ("time_sample", "time_filter", "time_train", "time_eval"):
        value = getattr(sl, key)
        if not re.fullmatch(r"(\d+-)?\d+(:\d{2}){0,2}", value):
            raise ConfigError(
                f"slurm.{key}={value!r}: not a Slurm time limit (minutes, H:MM:SS or D-HH:MM:SS)"
            )
    bad = [a for a in sl.extra_args if not a.startswith("-")]
    if bad:
        raise ConfigError(f"slurm.extra_args: {bad[0]!r} is not an sbatch option (e.g. --constraint=h100)")
    if sl.template_dir and not Path(sl.template_dir).is_dir():
        raise ConfigError(f"slurm.template_dir={sl.template_dir}: no such folder")


# Keys a resumed run may change without invalidating what is already on disk: each section names
# its own, and the train section's hold for the cold start's train section too.
RESUMABLE_CHANGES = frozenset(
    f"{section}.{key}"
    for section, keys in (
        ("loop", ("rounds",)),
        ("wandb", ("mode", "project")),
        ("data", DATA_RESUMABLE),
        ("sample", SAMPLE_RESUMABLE),
        ("grounding", GROUNDING_RESUMABLE),
        ("filter", FILTER_RESUMABLE),
        ("train", TRAIN_RESUMABLE),
        ("cold_start.train", TRAIN_RESUMABLE),
        ("rl", RL_RESUMABLE),
    )
    for key in keys
)
# Whole sections a resume may change: where and how jobs are scheduled.
RESUMABLE_SECTIONS = ("slurm.",)


def resumable(key: str) -> bool:
    """Whether a resumed run may change config key `key` without invalidating finished work."""
    return key in RESUMABLE_CHANGES or key.startswith(RESUMABLE_SECTIONS)


def to_yaml(cfg: Config | DictConfig) -> str:
    """The resolved config as YAML (secrets are never part of the schema, so nothing to strip)."""
    return OmegaConf.to_yaml(OmegaConf.structured(cfg))


def config_diff(old: Config, new: Config) -> list[str]:
    """Dotted keys whose values differ between two configs."""
    a = _flatten(OmegaConf.to_container(OmegaConf.structured(old)))
    b = _flatten(OmegaConf.to_container(OmegaConf.structured(new)))
    return sorted(k for k in a.keys() | b.keys() if a.get(k) != b.get(k))


def _flatten(tree: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    out: dict[str, Any] = {}
    for key, value in tree.items():
        name = f"{prefix}.{key}" if prefix else str(key)
        if isinstance(value, dict):
            out.update(_flatten(value, name))
        else:
            out[name] = value
    return out


def _merged(path: str | Path | None, overrides: list[str] | tuple[str, ...]) -> DictConfig:
    merged = OmegaConf.structured(Config)
    if path is not None:
        try:
            preset = OmegaConf.load(path)
        except OSError as exc:
            raise ConfigError(f"{path}: cannot read the config ({exc.strerror})") from None
        except Exception as exc:  # YAML syntax errors carry their own line and column
            raise ConfigError(f"{path}: not valid YAML ({exc})") from None
        merged = _merge(merged, preset, f"in {path}")
    for item in overrides:
        if "=" not in item:
            raise ConfigError(f"override {item!r}: expected key=value")
    return _merge(merged, OmegaConf.from_dotlist(list(overrides)), "in a command-line override")


def _merge(base: DictConfig, layer: Any, where: str) -> DictConfig:
    try:
        return OmegaConf.merge(base, layer)  # type: ignore[return-value]
    except OmegaConfBaseException as exc:
        raise ConfigError(_describe(exc, where)) from None


def _to_object(node: DictConfig) -> Any:
    try:
        return OmegaConf.to_object(node)
    except OmegaConfBaseException as exc:
        raise ConfigError(_describe(exc, "")) from None


def _describe(exc: OmegaConfBaseException, where: str) -> str:
    key = getattr(exc, "full_key", None) or getattr(exc, "key", None)
    return f"config key {key!r}{' ' + where if where else ''}: {getattr(exc, 'msg', None) or exc}"
