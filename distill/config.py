"""The one configuration schema of distill (OmegaConf structured dataclasses).

A run is configured by a YAML preset (configs/*.yaml) plus `key=value` overrides. Unknown keys
and values of the wrong type fail in `load_config`, before any work starts, naming the key.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from omegaconf import MISSING, DictConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException


class ConfigError(ValueError):
    """A configuration key or value is wrong; the message names the key."""


@dataclass
class TinyModelConfig:
    """Sizes of the tiny random Qwen2-Audio the loop builds when model.build_tiny is set
    (`distill make-tiny-model` builds the defaults)."""

    audio_d_model: int = 64
    audio_layers: int = 2
    audio_heads: int = 2
    text_hidden: int = 128
    text_layers: int = 2
    # vLLM's CPU attention takes head sizes 32, 64, 80, ... only.
    text_heads: int = 2
    text_kv_heads: int = 1
    text_intermediate: int = 256
    vocab_size: int = 512
    seed: int = 0


@dataclass
class ModelConfig:
    # Directory of a Hugging Face model (Qwen2-Audio layout).
    path: str = MISSING
    # Build a tiny random model at `path` when nothing is there yet (demo and tests).
    build_tiny: bool = False
    tiny: TinyModelConfig = field(default_factory=TinyModelConfig)


@dataclass
class SyntheticDataConfig:
    families: list[str] = field(default_factory=lambda: ["pitch_level"])
    difficulty: int = 1
    # Difficulty of the cold start's items (0: same as `difficulty`): a curriculum that starts
    # easy and leaves the harder question pool to the rounds.
    cold_start_difficulty: int = 0
    train_items: int = 64
    eval_items: int = 64
    seed: int = 0


@dataclass
class DataConfig:
    # JSONL manifests (data_pipelines.items schema); empty means: generate synthetic items.
    train_manifest: str = ""
    eval_manifest: str = ""
    # Items whose reference traces the cold start trains on (default: the train manifest).
    cold_start_manifest: str = ""
    synthetic: SyntheticDataConfig = field(default_factory=SyntheticDataConfig)
    sample_rate: int = 16000
    system_prompt: str = "You are a helpful assistant that listens carefully and reasons about sounds."


@dataclass
class EngineConfig:
    """vLLM offline engine settings shared by sampling, the export gate and eval."""

    max_model_len: int = 1024
    # On CPU vLLM must be given a KV-cache budget, or it reserves a share of RAM (ENVIRONMENT.md).
    kv_cache_memory_bytes: int = 256 * 1024 * 1024
    dtype: str = "auto"
    enforce_eager: bool = True
    gpu_memory_utilization: float = 0.85
    # Off by default: with it, vLLM's CPU sampler crashes on per-request seeds (ENVIRONMENT.md
    # addendum in README); on GPU it may be turned on for long prompts.
    enable_chunked_prefill: bool = False


@dataclass
class SampleConfig:
    n: int = 8
    temperature: float = 1.0
    top_p: float = 1.0
    max_tokens: int = 128
    # Appended to the rendered chat prompt so every trace starts inside a reasoning block.
    generation_prefix: str = "<think>\n"
    num_shards: int = 1
    # -1: all shards in this process; otherwise one shard (or SLURM_ARRAY_TASK_ID when set).
    shard_index: int = -1


@dataclass
class FilterConfig:
    # Keep at most this many passing traces per prompt.
    keep_per_prompt: int = 4
    min_reasoning_chars: int = 1


@dataclass
class TrainConfig:
    learning_rate: float = 5e-4
    weight_decay: float = 0.0
    warmup_steps: int = 5
    epochs: float = 1.0
    # Hard cap on optimizer steps (0: no cap).
    max_steps: int = 0
    micro_batch_size: int = 8
    grad_accum: int = 1
    max_seq_len: int = 1024
    # Loss weight of the tokens after </think> relative to the reasoning tokens.
    answer_loss_weight: float = 1.0
    max_grad_norm: float = 1.0
    freeze_audio_encoder: bool = True
    zero_stage: int = 2
    num_processes: int = 2
    # "cpu" forces CPU training (gloo); "auto" uses CUDA when present.
    device: str = "auto"
    mixed_precision: str = "no"
    seed: int = 0


@dataclass
class ColdStartConfig:
    enabled: bool = True
    # How many train items' reference traces the cold start sees (0: all). Reference reasoning is
    # scarce in practice; the rounds then write traces for the whole question pool.
    items: int = 0
    train: TrainConfig = field(default_factory=TrainConfig)


@dataclass
class EvalConfig:
    max_tokens: int = 128


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
    filter: FilterConfig = field(default_factory=FilterConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    cold_start: ColdStartConfig = field(default_factory=ColdStartConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    loop: LoopConfig = field(default_factory=LoopConfig)
    wandb: WandbConfig = field(default_factory=WandbConfig)

    @property
    def run_dir(self) -> Path:
        return Path(self.output_dir) / self.run_name


# Head sizes vLLM 0.32's CPU attention accepts (CPUAttentionBackend.get_supported_head_sizes).
VLLM_CPU_HEAD_SIZES = (32, 64, 80, 96, 112, 128, 160, 192, 224, 256, 512)

# Keys a resumed run may change without invalidating what is already on disk.
RESUMABLE_CHANGES = ("loop.rounds", "wandb.mode", "wandb.project", "sample.shard_index")

_CHOICES: dict[str, tuple[Any, ...]] = {
    "train.zero_stage": (0, 1, 2, 3),
    "cold_start.train.zero_stage": (0, 1, 2, 3),
    "train.device": ("auto", "cpu", "cuda"),
    "cold_start.train.device": ("auto", "cpu", "cuda"),
    "train.mixed_precision": ("no", "bf16", "fp16"),
    "cold_start.train.mixed_precision": ("no", "bf16", "fp16"),
    "wandb.mode": ("offline", "online", "disabled"),
    "data.synthetic.difficulty": (1, 2, 3),
    "data.synthetic.cold_start_difficulty": (0, 1, 2, 3),
}
_POSITIVE = (
    "sample.n", "sample.max_tokens", "sample.num_shards", "filter.keep_per_prompt", "train.micro_batch_size",
    "train.grad_accum", "train.num_processes", "loop.rounds", "eval.max_tokens", "engine.max_model_len",
    "cold_start.train.micro_batch_size", "cold_start.train.num_processes", "data.sample_rate",
    "cold_start.train.grad_accum", "train.max_seq_len", "cold_start.train.max_seq_len",
    "train.learning_rate", "cold_start.train.learning_rate", "engine.kv_cache_memory_bytes",
    "train.epochs", "cold_start.train.epochs", "data.synthetic.train_items", "data.synthetic.eval_items",
)
_NON_NEGATIVE = (
    "cold_start.items", "train.max_steps", "cold_start.train.max_steps", "train.warmup_steps",
    "cold_start.train.warmup_steps", "train.max_grad_norm", "cold_start.train.max_grad_norm",
    "train.answer_loss_weight", "cold_start.train.answer_loss_weight",
)


def _get(cfg: object, dotted: str) -> Any:
    for part in dotted.split("."):
        cfg = getattr(cfg, part)
    return cfg


def _validate(cfg: Config) -> None:
    for key, allowed in _CHOICES.items():
        value = _get(cfg, key)
        if value not in allowed:
            raise ConfigError(f"{key}={value!r}: must be one of {', '.join(map(repr, allowed))}")
    for key in _POSITIVE:
        value = _get(cfg, key)
        if value <= 0:
            raise ConfigError(f"{key}={value!r}: must be positive")
    for key in _NON_NEGATIVE:
        value = _get(cfg, key)
        if value < 0:
            raise ConfigError(f"{key}={value!r}: must be >= 0")
    if not cfg.data.synthetic.families:
        raise ConfigError("data.synthetic.families: give at least one family")
    if not 0.0 < cfg.sample.top_p <= 1.0:
        raise ConfigError(f"sample.top_p={cfg.sample.top_p!r}: must be in (0, 1]")
    if cfg.sample.temperature < 0:
        raise ConfigError(f"sample.temperature={cfg.sample.temperature!r}: must be >= 0")
    if not -1 <= cfg.sample.shard_index < cfg.sample.num_shards:
        raise ConfigError(
            f"sample.shard_index={cfg.sample.shard_index}: must be -1 or in [0, {cfg.sample.num_shards})"
        )
    for section in ("train", "cold_start.train"):
        tcfg = _get(cfg, section)
        if tcfg.zero_stage == 0 and tcfg.num_processes > 1:
            raise ConfigError(f"{section}.zero_stage=0 with {section}.num_processes={tcfg.num_processes}: "
                              "multi-process training runs through DeepSpeed; use zero_stage 1, 2 or 3")
        if tcfg.max_seq_len < cfg.engine.max_model_len:
            # A sampled trace fills up to max_model_len; a shorter training window would cut it.
            raise ConfigError(f"{section}.max_seq_len={tcfg.max_seq_len}: must be >= engine.max_model_len="
                              f"{cfg.engine.max_model_len}")
    if not 0.0 < cfg.engine.gpu_memory_utilization <= 1.0:
        raise ConfigError(f"engine.gpu_memory_utilization={cfg.engine.gpu_memory_utilization}: must be in (0, 1]")
    if cfg.data.cold_start_manifest and not cfg.data.train_manifest:
        raise ConfigError("data.cold_start_manifest: needs data.train_manifest and data.eval_manifest too")
    for key in ("sample.max_tokens", "eval.max_tokens"):
        if _get(cfg, key) >= cfg.engine.max_model_len:
            raise ConfigError(f"{key}={_get(cfg, key)}: must be below engine.max_model_len="
                              f"{cfg.engine.max_model_len}, which also holds the prompt and audio tokens")
    tiny = cfg.model.tiny
    if cfg.model.build_tiny and tiny.text_heads % tiny.text_kv_heads:
        raise ConfigError(f"model.tiny.text_heads={tiny.text_heads}: must be a multiple of "
                          f"model.tiny.text_kv_heads={tiny.text_kv_heads}")
    if cfg.model.build_tiny and (tiny.text_hidden % tiny.text_heads or tiny.text_hidden // tiny.text_heads
                                 not in VLLM_CPU_HEAD_SIZES):
        raise ConfigError(f"model.tiny.text_hidden/text_heads={tiny.text_hidden}/{tiny.text_heads}: the head size "
                          f"must be one of {VLLM_CPU_HEAD_SIZES} (vLLM's CPU attention)")
    if bool(cfg.data.train_manifest) != bool(cfg.data.eval_manifest):
        raise ConfigError("data.train_manifest and data.eval_manifest: give both or neither")
    from data_pipelines.synthetic import FAMILIES

    for name in cfg.data.synthetic.families:
        if name not in FAMILIES:
            raise ConfigError(
                f"data.synthetic.families: unknown family {name!r} (known: {', '.join(sorted(FAMILIES))})"
            )


def load_config(path: str | Path | None, overrides: list[str] | tuple[str, ...] = ()) -> Config:
    """Merge the schema, a YAML preset and `key=value` overrides; validate; return a typed Config.

    Raises ConfigError naming the offending key for unknown keys, wrong types and bad values.
    """
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
    merged = _merge(merged, OmegaConf.from_dotlist(list(overrides)), "in a command-line override")
    missing = sorted(OmegaConf.missing_keys(merged))
    if missing:
        raise ConfigError(f"missing required key(s): {', '.join(missing)}")
    try:
        cfg: Config = OmegaConf.to_object(merged)  # type: ignore[assignment]
    except OmegaConfBaseException as exc:
        raise ConfigError(_describe(exc, "")) from None
    _validate(cfg)
    return cfg


def _describe(exc: OmegaConfBaseException, where: str) -> str:
    key = getattr(exc, "full_key", None) or getattr(exc, "key", None)
    return f"config key {key!r}{' ' + where if where else ''}: {getattr(exc, 'msg', None) or exc}"


def _merge(base: DictConfig, layer: Any, where: str) -> DictConfig:
    try:
        return OmegaConf.merge(base, layer)  # type: ignore[return-value]
    except OmegaConfBaseException as exc:
        raise ConfigError(_describe(exc, where)) from None


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
