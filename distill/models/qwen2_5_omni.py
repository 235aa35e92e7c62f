"""Qwen2.5-Omni (Qwen2_5OmniForConditionalGeneration): distill trains its thinker, a Whisper-style
audio encoder that reads variable-length audio in 2 s windows and projects it itself, a vision
encoder (always frozen here), and a Qwen2.5 language model with 3-D M-RoPE. Checkpoints keep the
full-Omni layout (`thinker.*` keys, model_type qwen2_5_omni): vLLM has no thinker-only entry."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any, ClassVar

import numpy as np
import torch

from distill.models.omni_thinker import OmniThinker, mrope_section
from distill.models.tokenizer import train_tokenizer

SPECIAL_TOKENS = [
    "<|endoftext|>",
    "<|im_start|>",
    "<|im_end|>",
    "<|AUDIO|>",
    "<|audio_bos|>",
    "<|audio_eos|>",
    "<|IMAGE|>",
    "<|VIDEO|>",
    "<|vision_bos|>",
    "<|vision_eos|>",
]
# Tokenizer attributes the Omni processor reads (tokenizer_config.json of Qwen/Qwen2.5-Omni-7B).
TOKEN_ATTRIBUTES = {
    "audio_token": "<|AUDIO|>",
    "audio_bos_token": "<|audio_bos|>",
    "audio_eos_token": "<|audio_eos|>",
    "image_token": "<|IMAGE|>",
    "video_token": "<|VIDEO|>",
    "vision_bos_token": "<|vision_bos|>",
    "vision_eos_token": "<|vision_eos|>",
}

# The chat template published with Qwen/Qwen2.5-Omni-7B (chat_template.json), verbatim. Source:
# huggingface/transformers, tests/models/qwen2_5_omni/test_processing_qwen2_5_omni.py, whose 2025
# version passes it to Qwen2_5OmniProcessor.from_pretrained("Qwen/Qwen2.5-Omni-7B") in
# prepare_processor_dict; Qwen2.5-Omni-7B fine-tunes quote the same chat_template.jinja.
CHAT_TEMPLATE = (
    "{% set audio_count = namespace(value=0) %}{% set image_count = namespace(value=0) %}"
    "{% set video_count = namespace(value=0) %}{% for message in messages %}"
    "{% if loop.first and message['role'] != 'system' %}"
    "<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n{% endif %}"
    "<|im_start|>{{ message['role'] }}\n"
    "{% if message['content'] is string %}{{ message['content'] }}<|im_end|>\n{% else %}"
    "{% for content in message['content'] %}"
    "{% if content['type'] == 'image' or 'image' in content or 'image_url' in content %}"
    "{% set image_count.value = image_count.value + 1 %}"
    "{% if add_vision_id %}Picture {{ image_count.value }}: {% endif %}"
    "<|vision_bos|><|IMAGE|><|vision_eos|>"
    "{% elif content['type'] == 'audio' or 'audio' in content or 'audio_url' in content %}"
    "{% set audio_count.value = audio_count.value + 1 %}"
    "{% if add_audio_id %}Audio {{ audio_count.value }}: {% endif %}"
    "<|audio_bos|><|AUDIO|><|audio_eos|>"
    "{% elif content['type'] == 'video' or 'video' in content %}"
    "{% set video_count.value = video_count.value + 1 %}"
    "{% if add_vision_id %}Video {{ video_count.value }}: {% endif %}"
    "<|vision_bos|><|VIDEO|><|vision_eos|>"
    "{% elif 'text' in content %}{{ content['text'] }}{% endif %}{% endfor %}<|im_end|>\n{% endif %}"
    "{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)

# Full-Omni modules distill never loads: the speech output side.
SPEECH_PREFIXES = ("talker.", "token2wav.")
ARCHITECTURES = ["Qwen2_5OmniForConditionalGeneration"]
# The Whisper front end: the published model's mel bins, rate and hop, and WhisperFeatureExtractor's
# default 30 s window (the tiny model's; padding every clip to it is what the training forward avoids).
MEL_BINS = 128
SAMPLING_RATE = 16000
HOP_LENGTH = 160
CHUNK_SECONDS = 30
# chunk_length of Qwen/Qwen2.5-Omni-7B's preprocessor_config.json: its processor pads and cuts every
# item to 300 s (the encoder itself reads any length, in 2 s windows).
MAX_AUDIO_SECONDS = 300.0
# A tiny vision tower: the thinker class needs one; audio-only use never runs it. Heads of 32
# dimensions suit vLLM's CPU attention.
TINY_VISION = {
    "depth": 1,
    "hidden_size": 64,
    "num_heads": 2,
    "intermediate_size": 128,
    "fullatt_block_indexes": [0],
    "window_size": 112,
    "patch_size": 14,
    "spatial_merge_size": 2,
    "temporal_patch_size": 2,
}
TINY_ROPE_THETA = 1000000.0
TINY_MAX_POSITIONS = 4096


# The time rows' share of M-RoPE frequencies in the published model (mrope_section).
MROPE_TIME_SHARE = 0.25


class Qwen25Omni(OmniThinker):
    name = "qwen2_5_omni"
    title = "Qwen2.5-Omni"
    model_types = ("qwen2_5_omni",)
    # The audio tower ends in its own projection to the text width (`proj`, the role Qwen2-Audio's
    # multi_modal_projector plays): that is the projector; the rest of the tower is the encoder.
    parts: ClassVar[dict[str, tuple[str, ...]]] = {
        "audio_encoder": ("audio_tower.",),
        "projector": ("audio_tower.proj.",),
        "language_model": ("model.", "lm_head."),
    }
    # The text model's layers only ("audio_tower.layers.*" and "visual.blocks.*" have projections of
    # the same names); peft full-matches it against module names, which may carry its own prefix.
    lora_scope = r"(?:base_model\.model\.)?model\.layers\.\d+\..*\.({})"
    max_audio_seconds = MAX_AUDIO_SECONDS
    speech_prefixes = SPEECH_PREFIXES

    # --- loading and saving -------------------------------------------------------------
    def thinker_class(self) -> type:
        from transformers import Qwen2_5OmniThinkerForConditionalGeneration

        return Qwen2_5OmniThinkerForConditionalGeneration

    def omni_config(self, thinker_config: dict, dtype: torch.dtype) -> Any:
        return full_config(thinker_config, dtype)

    def build_tiny(self, out_dir: Path, cfg: Any) -> None:
        from transformers import (
            GenerationConfig,
            Qwen2_5OmniThinkerConfig,
            Qwen2_5OmniThinkerForConditionalGeneration,
        )

        self.prepare_runtime()
        tokenizer = train_tokenizer(
            cfg.vocab_size, SPECIAL_TOKENS, CHAT_TEMPLATE, extra_special_tokens=TOKEN_ATTRIBUTES
        )
        processor = tiny_processor(tokenizer)
        torch.manual_seed(cfg.seed)
        config = Qwen2_5OmniThinkerConfig(**tiny_thinker_config(cfg, tokenizer))
        model = Qwen2_5OmniThinkerForConditionalGeneration(config)
        model.generation_config = GenerationConfig(
            eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id
        )
        self.save(model, out_dir)
        processor.save_pretrained(out_dir)

    # --- the training forward -----------------------------------------------------------
    def features(self, feature_extractor, chunks: list[np.ndarray]) -> tuple[torch.Tensor, torch.Tensor]:
        """The processor's features (every clip padded to chunk_length, 30 or 300 s, so the mel frames
        are exactly those it and vLLM compute), cut to the longest real clip: the encoder reads real
        frames only."""
        features, mask = super().features(feature_extractor, chunks)
        width = int(mask.sum(-1).max())
        return features[..., :width], mask[:, :width]

    def encode(
        self, model: torch.nn.Module, features: torch.Tensor, mask: torch.Tensor
    ) -> list[torch.Tensor]:
        """Each chunk's encoder output before the tower's projection (what the cache may keep while
        the projection trains), as the thinker's get_audio_features computes it over the real
        frames of all chunks: the input of `proj`, caught by a hook (the tower's forward offers no
        other way out before it)."""
        tower = model.audio_tower
        lengths = mask.sum(-1)
        frames = features.transpose(1, 2)[mask.bool()].T  # [mel, real frames of every chunk]
        caught: list[torch.Tensor] = []
        hook = tower.proj.register_forward_hook(lambda module, args, output: caught.append(args[0]))
        try:
            tower(frames, feature_lens=lengths)
        finally:
            hook.remove()
        _, out_lengths = tower._get_feat_extract_output_lengths(lengths)
        return list(caught[0].split(out_lengths.tolist()))

    def project(self, model: torch.nn.Module, encoded: torch.Tensor) -> torch.Tensor:
        return model.audio_tower.proj(encoded)

    def audio_tokens_per_item(self, seconds: float, feature_extractor_config: dict) -> int:
        """Mel frames of the real samples (the processor cuts at chunk_length), then the encoder's
        stride-2 conv and stride-2 pool (_get_feat_extract_output_lengths): 25 per second."""
        rate = feature_extractor_config.get("sampling_rate", SAMPLING_RATE)
        hop = feature_extractor_config.get("hop_length", HOP_LENGTH)
        seconds = min(seconds, feature_extractor_config.get("chunk_length", CHUNK_SECONDS))
        frames = math.ceil(math.ceil(seconds * rate) / hop)
        return ((frames - 1) // 2 + 1 - 2) // 2 + 1


def full_config(thinker_config: dict, dtype: torch.dtype):
    """The full-Omni config vLLM loads: the thinker only (enable_audio_output=False)."""
    from transformers import Qwen2_5OmniConfig

    thinker_config = {**thinker_config, "dtype": dtype}
    config = Qwen2_5OmniConfig(thinker_config=thinker_config, enable_audio_output=False)
    config.architectures = ARCHITECTURES
    config.dtype = dtype
    return config


def tiny_thinker_config(cfg: Any, tokenizer) -> dict:
    """Qwen2_5OmniThinkerConfig arguments of the sizes in `cfg` (a TinyModelConfig)."""
    ids = {name: tokenizer.convert_tokens_to_ids(token) for name, token in TOKEN_ATTRIBUTES.items()}
    head_dim = cfg.text_hidden // cfg.text_heads
    return {
        "audio_config": {
            "d_model": cfg.audio_d_model,
            "encoder_layers": cfg.audio_layers,
            "encoder_attention_heads": cfg.audio_heads,
            "encoder_ffn_dim": cfg.audio_d_model * 4,
            "num_mel_bins": MEL_BINS,
            "output_dim": cfg.text_hidden,
        },
        "vision_config": {**TINY_VISION, "out_hidden_size": cfg.text_hidden},
        "text_config": {
            "vocab_size": len(tokenizer),
            "hidden_size": cfg.text_hidden,
            "intermediate_size": cfg.text_intermediate,
            "num_hidden_layers": cfg.text_layers,
            "num_attention_heads": cfg.text_heads,
            "num_key_value_heads": cfg.text_kv_heads,
            "max_position_embeddings": TINY_MAX_POSITIONS,
            "tie_word_embeddings": False,
            "rope_parameters": {
                "rope_type": "default",
                "rope_theta": TINY_ROPE_THETA,
                "mrope_section": mrope_section(head_dim, MROPE_TIME_SHARE),
            },
            "bos_token_id": tokenizer.convert_tokens_to_ids("<|endoftext|>"),
            "eos_token_id": tokenizer.eos_token_id,
        },
        "audio_token_index": ids["audio_token"],
        "image_token_index": ids["image_token"],
        "video_token_index": ids["video_token"],
        "audio_start_token_id": ids["audio_bos_token"],
        "audio_end_token_id": ids["audio_eos_token"],
        "vision_start_token_id": ids["vision_bos_token"],
        "vision_end_token_id": ids["vision_eos_token"],
    }


def tiny_processor(tokenizer):
    """Qwen2_5OmniProcessor with the published Whisper front end, the PIL Qwen2-VL image processor
    and the video processor registered for the family (a null one on CPU installs, omni_cpu)."""
    from transformers import Qwen2_5OmniConfig, Qwen2_5OmniProcessor, WhisperFeatureExtractor
    from transformers.models.auto.video_processing_auto import VIDEO_PROCESSOR_MAPPING
    from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import Qwen2VLImageProcessorPil

    video_processor = VIDEO_PROCESSOR_MAPPING[Qwen2_5OmniConfig]["torchvision"]()
    feature_extractor = WhisperFeatureExtractor(
        feature_size=MEL_BINS, sampling_rate=SAMPLING_RATE, chunk_length=CHUNK_SECONDS, hop_length=HOP_LENGTH
    )
    return Qwen2_5OmniProcessor(
        image_processor=Qwen2VLImageProcessorPil(),
        video_processor=video_processor,
        feature_extractor=feature_extractor,
        tokenizer=tokenizer,
        chat_template=CHAT_TEMPLATE,
    )
