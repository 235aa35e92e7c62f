"""The model-family interface: everything distill needs to know about one architecture.

A family is one module in distill/models/ with a subclass of `Family`, registered in
distill/models/registry.py. The stages call only these methods: which parameters train, how audio
becomes embeddings, where they go in the sequence, which positions the language model takes, the
checkpoint layout vLLM loads, the reference forward the export gate compares against, and a tiny
random model of the real classes for tests and demos. Nothing outside distill/models/ names a
family's classes, model types or placeholder tokens.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any, ClassVar

import numpy as np
import torch


class Family:
    """One architecture. Subclasses set the class attributes and implement the methods that raise
    NotImplementedError; the defaults fit a Whisper-style encoder with 30 s windows."""

    # CLI and config name (`--family`, model.tiny.family), e.g. "qwen2_audio".
    name: str = ""
    # What users call it, e.g. "Qwen2-Audio".
    title: str = ""
    # config.json model_type values this family reads.
    model_types: tuple[str, ...] = ()
    # Trainable part -> parameter-name prefixes in the training model. A parameter in no part
    # (a vision tower the loop never feeds) stays frozen.
    parts: ClassVar[dict[str, tuple[str, ...]]] = {}
    # Regex of the modules LoRA wraps; "{}" takes the configured projection names. Never the encoder.
    lora_scope: str = ""
    # Regex of modules LoRA must leave alone even where peft's own reading of lora_scope reaches them
    # (None: nothing beyond the scope).
    lora_exclude: str | None = None
    # Longest audio item the family's encoder reads, in seconds (its processor cuts the rest).
    max_audio_seconds: float = 30.0
    # Audio items one prompt may carry (None: no limit of the family's own).
    max_audio_items: int | None = None

    # --- loading and saving -------------------------------------------------------------
    def prepare_runtime(self) -> None:
        """Make this process (and the processes it starts) able to load the family: import hooks
        a CPU install needs. Called before a processor, a model or a vLLM engine is loaded."""

    def serving_env(self) -> dict[str, str]:
        """Environment a separately started vLLM server needs for this family here (prepare_runtime's
        part that a printed command must carry)."""
        return {}

    def load_for_training(self, model_dir: str | Path, dtype: torch.dtype, attention: str) -> torch.nn.Module:
        """The model training updates (for Omni checkpoints: the thinker only)."""
        raise NotImplementedError

    def reference_model(self, model_dir: str | Path) -> torch.nn.Module:
        """The family's own transformers model in float32, eval mode: its forward, called with the
        processor's output, is the reference the export gate and the tests hold distill to."""
        return self.load_for_training(model_dir, torch.float32, "sdpa").eval()

    def checkpoint_state_dict(self, state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """The training model's state dict renamed to the checkpoint layout vLLM loads."""
        raise NotImplementedError

    def save(
        self, model: torch.nn.Module, out_dir: str | Path, state: dict[str, torch.Tensor] | None = None
    ) -> None:
        """Write config and weights (`state`, default the model's) where vLLM and transformers load them."""
        state = self.checkpoint_state_dict(state if state is not None else model.state_dict())
        model.save_pretrained(out_dir, state_dict=state, safe_serialization=True, save_original_format=False)

    def build_tiny(self, out_dir: Path, cfg: Any) -> None:
        """Write a tiny random model of the real classes (weights, config, processor, chat
        template) into the empty folder `out_dir`; cfg is a distill.models.config.TinyModelConfig."""
        raise NotImplementedError

    # --- the training forward -----------------------------------------------------------
    def text_config(self, config) -> Any:
        """The language model's config inside the model's (top-level) config."""
        return config.text_config

    def audio_tower(self, model: torch.nn.Module) -> torch.nn.Module:
        raise NotImplementedError

    def decoder(self, model: torch.nn.Module) -> torch.nn.Module:
        """The language model body: takes inputs_embeds and position ids, returns hidden states."""
        raise NotImplementedError

    def lm_head(self, model: torch.nn.Module) -> torch.nn.Module:
        return model.lm_head

    def serving_audio(self, feature_extractor, chunks: list[np.ndarray]) -> list[np.ndarray]:
        """The waveforms as vLLM's model code hands them to the processor (it may pad them): what
        training, its placeholder counts and the reference forward must see too."""
        return chunks

    def features(self, feature_extractor, chunks: list[np.ndarray]) -> tuple[torch.Tensor, torch.Tensor]:
        """(input_features, feature mask) for audio chunks, as the family's processor makes them."""
        enc = feature_extractor(
            chunks,
            sampling_rate=feature_extractor.sampling_rate,
            return_attention_mask=True,
            padding="max_length",
            return_tensors="pt",
        )
        return enc["input_features"], enc["attention_mask"]

    def processor_audio_inputs(self, feature_extractor, chunks: list[np.ndarray]) -> dict[str, torch.Tensor]:
        """The audio arguments of the family's own forward as its processor makes them, padding
        included (what a plain transformers training loop feeds; the benchmark's baseline)."""
        enc = feature_extractor(
            chunks,
            sampling_rate=feature_extractor.sampling_rate,
            return_attention_mask=True,
            padding="max_length",
            return_tensors="pt",
        )
        return {"input_features": enc["input_features"], "feature_attention_mask": enc["attention_mask"]}

    def encode(
        self, model: torch.nn.Module, features: torch.Tensor, mask: torch.Tensor
    ) -> list[torch.Tensor]:
        """The audio encoder's output for each chunk over its real frames: what a frozen encoder's
        cache keeps (before any trainable projector)."""
        raise NotImplementedError

    def project(self, model: torch.nn.Module, encoded: torch.Tensor) -> torch.Tensor:
        """Encoder output -> language-model embeddings, one per audio placeholder."""
        return encoded

    def position_ids(self, positions: torch.Tensor) -> torch.Tensor:
        """What the decoder takes as position ids, from per-sample positions [batch, length] that
        restart at 0 for every packed sample (1-D RoPE: as they are)."""
        return positions

    def audio_token(self, processor) -> str:
        """The placeholder the processor expands to one token per audio embedding."""
        return processor.audio_token

    def max_item_seconds(self, feature_extractor_config: dict) -> float:
        """The longest audio item this checkpoint reads: its feature extractor's window
        (chunk_length; the processor cuts the rest), at most the family's max_audio_seconds."""
        window = feature_extractor_config.get("chunk_length")
        return min(float(window), self.max_audio_seconds) if window else self.max_audio_seconds

    def audio_tokens_per_item(self, seconds: float, feature_extractor_config: dict) -> int:
        """Audio placeholders an item of `seconds` becomes (the most, for the prompt budget)."""
        raise NotImplementedError

    def markup_tokens(self, tokenizer) -> tuple[str, ...]:
        """Tokens that mark audio input in a prompt: never to be generated (a trace holding one
        would be read as a slot for audio by every later stage)."""
        return tuple(
            t.content
            for t in tokenizer.added_tokens_decoder.values()
            if t.special and "audio" in t.content.lower()
        )

    # --- helpers for subclasses -------------------------------------------------------------
    @staticmethod
    def renamed(
        state: dict[str, torch.Tensor], prefixes: tuple[tuple[str, str], ...]
    ) -> dict[str, torch.Tensor]:
        """`state` with each key's first matching (native, original) prefix replaced; others as they are."""
        out = {}
        for key, value in state.items():
            native = next((pair for pair in prefixes if key.startswith(pair[0])), None)
            out[native[1] + key[len(native[0]) :] if native else key] = value
        return out

    def lora_target(self, module_names: list[str]) -> str:
        return self.lora_scope.format("|".join(map(re.escape, module_names)))
