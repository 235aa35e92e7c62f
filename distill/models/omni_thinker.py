"""What the Qwen-Omni families share: distill trains the thinker of a full-Omni checkpoint.

A full checkpoint holds the thinker (audio and vision encoders, the language model) and the
speech side (talker and its vocoder). distill loads the thinker from the `thinker.*` keys and
saves a full-Omni config without speech output around it, which vLLM runs (vLLM has no entry for
a thinker-only model type) and transformers loads back. The language model takes 3-D M-RoPE
positions; for text and audio they are the same sequential positions in all three rows.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from distill.models.family import Family

CHECKPOINT_PREFIX = "thinker."
# Words that mark a special token as audio or vision markup, which a trace must never generate.
MARKUP_WORDS = ("audio", "vision", "image", "video")


def mrope_section(head_dim: int, time_share: float) -> list[int]:
    """M-RoPE's split of a head's rotary frequencies into (time, height, width), summing to
    head_dim/2, with height and width equal and time taking about `time_share` of them (as the
    published models do: 16/24/24 for Qwen2.5-Omni, 24/20/20 for Qwen3-Omni at head_dim 128)."""
    half = head_dim // 2
    spatial = round(half * (1 - time_share) / 2)
    return [half - 2 * spatial, spatial, spatial]


class OmniThinker(Family):
    """A Qwen-Omni family: subclasses name the thinker class, the speech-side key prefixes and the
    full-Omni config they save."""

    # Full-Omni modules distill never loads: the speech output side.
    speech_prefixes: tuple[str, ...] = ()
    max_audio_items = None

    def thinker_class(self) -> type:
        """The transformers class of the thinker."""
        raise NotImplementedError

    def omni_config(self, thinker_config: dict, dtype: torch.dtype) -> Any:
        """The full-Omni config vLLM loads around `thinker_config`, speech output off."""
        raise NotImplementedError

    # --- loading and saving -------------------------------------------------------------
    def prepare_runtime(self) -> None:
        """The torchvision-free import hooks a CPU install needs (here and in vLLM's subprocesses)."""
        from distill.models import omni_cpu

        omni_cpu.enable()

    def serving_env(self) -> dict[str, str]:
        from distill.models import omni_cpu

        return {"PYTHONPATH": str(omni_cpu.HERE)} if omni_cpu.needed() else {}

    def load_for_training(self, model_dir: str | Path, dtype: torch.dtype, attention: str) -> torch.nn.Module:
        """The thinker, from the `thinker.*` keys of a full-Omni checkpoint (the full class's
        from_pretrained would build the talker and want its speaker file). The thinker's
        base_model_prefix is "thinker", so from_pretrained strips it, over one file or an index of
        shards. Keys that do not fit are refused, named."""
        from transformers import AutoConfig
        from transformers.utils import logging

        config = AutoConfig.from_pretrained(model_dir).thinker_config
        # Its load report would list every talker key of a full checkpoint; the check below says what matters.
        verbosity = logging.get_verbosity()
        logging.set_verbosity_error()
        try:
            # Mismatched sizes are listed and refused below (a missing expert of an MoE shows as
            # one: the stack of the experts found is too short), not raised without naming them.
            model, info = self.thinker_class().from_pretrained(
                model_dir,
                config=config,
                dtype=dtype,
                attn_implementation=attention,
                output_loading_info=True,
                ignore_mismatched_sizes=True,
            )
        finally:
            logging.set_verbosity(verbosity)
        unexpected = sorted(k for k in info["unexpected_keys"] if not k.startswith(self.speech_prefixes))
        problems = {
            "missing": sorted(info["missing_keys"]),
            "unexpected": unexpected,
            "mismatched": sorted(
                f"{key} {tuple(found)} for {tuple(wanted)}" for key, found, wanted in info["mismatched_keys"]
            ),
        }
        if any(problems.values()):
            found = "; ".join(f"{kind}: {', '.join(keys[:5])}" for kind, keys in problems.items() if keys)
            raise ValueError(
                f"{model_dir}: the checkpoint's thinker.* weights do not fit the thinker ({found})"
            )
        return model

    def checkpoint_state_dict(self, state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        return {CHECKPOINT_PREFIX + key: value for key, value in state.items()}

    def save(
        self, model: torch.nn.Module, out_dir: str | Path, state: dict[str, torch.Tensor] | None = None
    ) -> None:
        """A full-Omni checkpoint without speech output: the family's full config around the
        thinker's, `thinker.*` weights (sharded with an index when large), the generation config."""
        from huggingface_hub import save_torch_state_dict

        state = self.checkpoint_state_dict(state if state is not None else model.state_dict())
        out_dir = Path(out_dir)
        out_dir.mkdir(parents=True, exist_ok=True)
        dtype = next(v.dtype for v in state.values() if v.is_floating_point())
        self.omni_config(model.config.to_dict(), dtype).save_pretrained(out_dir)
        model.generation_config.save_pretrained(out_dir)
        # Tied embeddings: keep embed_tokens, which vLLM and transformers tie lm_head to (the
        # default keeps the name that sorts first).
        save_torch_state_dict(
            state, out_dir, shared_tensors_to_discard=[CHECKPOINT_PREFIX + "lm_head.weight"]
        )

    # --- the training forward -----------------------------------------------------------
    def text_config(self, config) -> Any:
        return config.thinker_config.text_config

    def audio_tower(self, model: torch.nn.Module) -> torch.nn.Module:
        return model.audio_tower

    def decoder(self, model: torch.nn.Module) -> torch.nn.Module:
        return model.model

    def position_ids(self, positions: torch.Tensor) -> torch.Tensor:
        """[4, batch, length]: text positions (row 0, from which the text model builds the packed
        causal mask; given 2-D ids it builds none and packed samples attend to each other) over the
        three M-RoPE rows, the same sequential positions for text and audio."""
        return positions.unsqueeze(0).expand(4, -1, -1)

    def markup_tokens(self, tokenizer) -> tuple[str, ...]:
        """The audio and the vision markup (the thinker reads images and video too)."""
        return tuple(
            t.content
            for t in tokenizer.added_tokens_decoder.values()
            if t.special and any(word in t.content.lower() for word in MARKUP_WORDS)
        )
