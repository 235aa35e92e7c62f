"""The `train` config section, which `cold_start.train` repeats for the cold start: optimizer,
batches, trainable parts, LoRA, DeepSpeed, extra data. One check serves both."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from omegaconf import MISSING

from distill.core.schema import ConfigError, check_choices, check_non_negative, check_positive

ATTN_IMPLEMENTATIONS = ("auto", "sdpa", "eager", "flash_attention_2", "flash_attention_3")
MIX_KINDS = ("text_cot", "direct_audio")
# Keys of a train section a resumed run may change: how the work is done, not what it produces.
RESUMABLE = ("save_steps", "audio_encoder_cache_mb", "collective_timeout_s")


@dataclass
class TrainableConfig:
    """Which parts of the model train. The report keeps the audio encoder frozen throughout."""

    audio_encoder: bool = False
    projector: bool = True
    language_model: bool = True


@dataclass
class LoraConfig:
    """LoRA (peft) on the language model only; merged into full weights when training ends."""

    enabled: bool = False
    r: int = 16
    alpha: int = 32
    dropout: float = 0.05
    # Projection names inside the language model's layers (the audio encoder's are never wrapped).
    target_modules: list[str] = field(
        default_factory=lambda: ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
    )


@dataclass
class MixSourceConfig:
    """Extra SFT data mixed with the round's kept traces.

    kind "text_cot": JSONL rows {"id"?, "question", "reasoning", "answer"} (text-only chain of
    thought); kind "direct_audio": items in any data_pipelines reader format, trained as
    `<think>\n\n</think>\n{answer}`. `weight` is rows of this source per kept-trace row.
    """

    kind: str = MISSING
    path: str = MISSING
    weight: float = 0.1


@dataclass
class TrainConfig:
    learning_rate: float = 5e-4
    weight_decay: float = 0.0
    warmup_steps: int = 5
    epochs: float = 1.0
    # Hard cap on optimizer steps (0: no cap).
    max_steps: int = 0
    # Samples per micro batch (per rank); packing lays them in rows of up to max_seq_len tokens.
    micro_batch_size: int = 8
    grad_accum: int = 1
    # Longest training sequence (and packed row) in tokens.
    max_seq_len: int = 1024
    # Pack several samples into each row (attention and positions kept per sample), so no compute
    # goes to padding. Off: one sample per row, padded; group_by_length keeps the padding small.
    # null (auto): on with flash-attention (varlen: no cost across samples), off otherwise, as a
    # block-diagonal mask computes attention over the whole packed row (measured slower on CPU).
    packing: bool | None = None
    group_by_length: bool = True
    # With several ranks, give all the rows of one audio clip to one rank (clips dealt to keep the
    # ranks' token counts even), so that each clip meets one rank's audio encoder cache once.
    rank_by_clip: bool = True
    # "auto": flash_attention_2 on GPU when flash-attn is installed, else sdpa.
    attn_implementation: str = "auto"
    # Loss weight of the tokens after </think> relative to the reasoning tokens.
    answer_loss_weight: float = 1.0
    max_grad_norm: float = 1.0
    trainable: TrainableConfig = field(default_factory=TrainableConfig)
    lora: LoraConfig = field(default_factory=LoraConfig)
    gradient_checkpointing: bool = False
    # A frozen audio encoder gives the same output for the same clip every time: compute it once
    # per clip (traces of one item share their audio) and keep it up to this many MiB (0: off).
    # Not with ZeRO-3, where every rank must run every module.
    audio_encoder_cache_mb: int = 1024
    zero_stage: int = 2
    # A DeepSpeed JSON config (configs/deepspeed/*.json) instead of the one built from zero_stage.
    deepspeed_config: str = ""
    offload_optimizer: bool = False
    num_processes: int = 2
    # How long a rank waits for its peers, at start and in each collective, before it exits with
    # a message: a rank whose peer died or hangs must not block for ever.
    collective_timeout_s: float = 600.0
    # "cpu" forces CPU training (gloo); "auto" uses CUDA when present.
    device: str = "auto"
    # "auto": bf16 on GPU, full precision on CPU.
    mixed_precision: str = "auto"
    # Save the training state every this many optimizer steps, so an interrupted stage resumes
    # from its last checkpoint (0: never).
    save_steps: int = 50
    # Extra data mixed with the kept traces.
    mix: list[MixSourceConfig] = field(default_factory=list)
    # Where each round's student starts: "continue" from the previous round's model, or "base":
    # the base model retrained on the kept traces of every round so far (ReST-EM).
    init: str = "continue"
    seed: int = 0


@dataclass
class ColdStartConfig:
    enabled: bool = True
    # How many train items' reference traces the cold start sees (0: all). Reference reasoning is
    # scarce in practice; the rounds then write traces for the whole question pool.
    items: int = 0
    train: TrainConfig = field(default_factory=TrainConfig)


def validate_train(section: str, tcfg: TrainConfig) -> None:
    """Raise ConfigError for the first bad value of the train section `section` ("train" or
    "cold_start.train")."""
    check_choices(
        section,
        tcfg,
        {
            "zero_stage": (0, 1, 2, 3),
            "device": ("auto", "cpu", "cuda"),
            "mixed_precision": ("auto", "no", "bf16", "fp16"),
            "init": ("continue", "base"),
            "attn_implementation": ATTN_IMPLEMENTATIONS,
        },
    )
    check_positive(
        section,
        tcfg,
        (
            "micro_batch_size",
            "grad_accum",
            "num_processes",
            "max_seq_len",
            "learning_rate",
            "epochs",
            "collective_timeout_s",
        ),
    )
    check_positive(f"{section}.lora", tcfg.lora, ("r", "alpha"))
    check_non_negative(
        section,
        tcfg,
        (
            "max_steps",
            "warmup_steps",
            "max_grad_norm",
            "answer_loss_weight",
            "save_steps",
            "audio_encoder_cache_mb",
        ),
    )
    if tcfg.zero_stage == 0 and tcfg.num_processes > 1:
        raise ConfigError(
            f"{section}.zero_stage=0 with {section}.num_processes={tcfg.num_processes}: "
            "multi-process training runs through DeepSpeed; use zero_stage 1, 2 or 3"
        )
    parts = tcfg.trainable
    if not (parts.audio_encoder or parts.projector or parts.language_model or tcfg.lora.enabled):
        raise ConfigError(
            f"{section}.trainable: nothing trains; make a part trainable or enable {section}.lora"
        )
    if tcfg.lora.enabled and parts.audio_encoder:
        raise ConfigError(
            f"{section}.lora.enabled with {section}.trainable.audio_encoder=true: LoRA adapts the "
            "language model only; train the encoder fully without LoRA, or keep it frozen"
        )
    if tcfg.lora.enabled and not parts.language_model:
        raise ConfigError(
            f"{section}.lora.enabled with {section}.trainable.language_model=false: the adapters are "
            "the language model's training; enable one without the other"
        )
    if tcfg.zero_stage == 0 and (tcfg.offload_optimizer or tcfg.deepspeed_config):
        raise ConfigError(
            f"{section}.offload_optimizer / deepspeed_config need DeepSpeed: set {section}.zero_stage"
        )
    if tcfg.attn_implementation.startswith("flash_attention") and tcfg.device == "cpu":
        raise ConfigError(
            f"{section}.attn_implementation={tcfg.attn_implementation}: flash-attention runs on GPU only"
        )
    if not 0 <= tcfg.lora.dropout < 1:
        raise ConfigError(f"{section}.lora.dropout={tcfg.lora.dropout}: must be in [0, 1)")
    if tcfg.deepspeed_config and not Path(tcfg.deepspeed_config).is_file():
        raise ConfigError(f"{section}.deepspeed_config={tcfg.deepspeed_config}: no such file")
    for i, src in enumerate(tcfg.mix):
        if src.kind not in MIX_KINDS:
            raise ConfigError(f"{section}.mix[{i}].kind={src.kind!r}: must be one of {', '.join(MIX_KINDS)}")
        if not src.weight > 0:
            raise ConfigError(f"{section}.mix[{i}].weight={src.weight}: must be positive")
        if not Path(src.path).exists():
            raise ConfigError(f"{section}.mix[{i}].path={src.path}: no such file")


def validate_cold_start(cold_start: ColdStartConfig) -> None:
    """Raise ConfigError for the first bad value of the `cold_start` section, its train section
    included."""
    check_non_negative("cold_start", cold_start, ("items",))
    # Checked before the train section's own choices, so that any other init names the cold start's rule.
    if cold_start.train.init != "continue":
        raise ConfigError(
            "cold_start.train.init: the cold start trains the base model; train.init picks the rounds'"
        )
    validate_train("cold_start.train", cold_start.train)
