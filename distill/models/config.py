"""The `model` config section: the model to distill, or the tiny random one the demo and the
tests build, with the checks of its own values."""

from __future__ import annotations

from dataclasses import dataclass, field

from omegaconf import MISSING

from distill.core.schema import ConfigError

# Head sizes vLLM 0.32's CPU attention accepts (CPUAttentionBackend.get_supported_head_sizes).
VLLM_CPU_HEAD_SIZES = (32, 64, 80, 96, 112, 128, 160, 192, 224, 256, 512)


@dataclass
class TinyModelConfig:
    """The tiny random model the loop builds when model.build_tiny is set (`distill
    make-tiny-model` builds the defaults): its family (distill/models) and sizes."""

    family: str = "qwen2_audio"

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
    # Directory of a Hugging Face model of a supported family (distill/models).
    path: str = MISSING
    # Build a tiny random model at `path` when nothing is there yet (demo and tests).
    build_tiny: bool = False
    tiny: TinyModelConfig = field(default_factory=TinyModelConfig)


def validate(model: ModelConfig) -> None:
    """Raise ConfigError for a tiny model vLLM could not run (checked only when one is built)."""
    if not model.build_tiny:
        return
    tiny = model.tiny
    if tiny.text_heads % tiny.text_kv_heads:
        raise ConfigError(
            f"model.tiny.text_heads={tiny.text_heads}: must be a multiple of "
            f"model.tiny.text_kv_heads={tiny.text_kv_heads}"
        )
    if tiny.text_hidden % tiny.text_heads or tiny.text_hidden // tiny.text_heads not in VLLM_CPU_HEAD_SIZES:
        raise ConfigError(
            f"model.tiny.text_hidden/text_heads={tiny.text_hidden}/{tiny.text_heads}: the head size "
            f"must be one of {VLLM_CPU_HEAD_SIZES} (vLLM's CPU attention)"
        )
