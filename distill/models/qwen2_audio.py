"""Qwen2-Audio (Qwen2AudioForConditionalGeneration): a Whisper encoder over 30 s windows, a
linear projector, and a Qwen2 language model with 1-D RoPE."""

from __future__ import annotations

from pathlib import Path
from typing import ClassVar

import torch

from distill.models.family import Family
from distill.models.tokenizer import train_tokenizer

SPECIAL_TOKENS = [
    "<|endoftext|>",
    "<|im_start|>",
    "<|im_end|>",
    "<|AUDIO|>",
    "<|audio_bos|>",
    "<|audio_eos|>",
]

# Qwen2-Audio's published chat template.
CHAT_TEMPLATE = (
    "{% set audio_count = namespace(value=0) %}{% for message in messages %}"
    "{% if loop.first and message['role'] != 'system' %}<|im_start|>system\nYou are a helpful assistant."
    "<|im_end|>\n{% endif %}<|im_start|>{{ message['role'] }}\n{% if message['content'] is string %}"
    "{{ message['content'] }}<|im_end|>\n{% else %}{% for content in message['content'] %}"
    "{% if 'audio' in content or 'audio_url' in content or content['type'] == 'audio' %}"
    "{% set audio_count.value = audio_count.value + 1 %}Audio {{ audio_count.value }}: "
    "<|audio_bos|><|AUDIO|><|audio_eos|>\n{% elif 'text' in content %}{{ content['text'] }}{% endif %}"
    "{% endfor %}<|im_end|>\n{% endif %}{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n"
    "{% endif %}"
)

# transformers 5.x module names -> the original checkpoint layout, which vLLM loads.
# transformers' own reverse conversion on save can write `language_model.model.model.*` keys
# (ENVIRONMENT.md), which vLLM rejects, so the mapping is spelled out here.
CHECKPOINT_PREFIXES = (
    ("model.audio_tower.", "audio_tower."),
    ("model.multi_modal_projector.", "multi_modal_projector."),
    ("model.language_model.", "language_model.model."),
    ("lm_head.", "language_model.lm_head."),
)


class Qwen2Audio(Family):
    name = "qwen2_audio"
    title = "Qwen2-Audio"
    model_types = ("qwen2_audio",)
    parts: ClassVar[dict[str, tuple[str, ...]]] = {
        "audio_encoder": ("model.audio_tower.",),
        "projector": ("model.multi_modal_projector.",),
        "language_model": ("model.language_model.", "lm_head."),
    }
    lora_scope = r"model\.language_model\..*\.({})"
    max_audio_seconds = 30.0

    def load_for_training(self, model_dir: str | Path, dtype: torch.dtype, attention: str) -> torch.nn.Module:
        from transformers import Qwen2AudioForConditionalGeneration

        return Qwen2AudioForConditionalGeneration.from_pretrained(
            model_dir, dtype=dtype, attn_implementation=attention
        )

    def checkpoint_state_dict(self, state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        return self.renamed(state, CHECKPOINT_PREFIXES)

    def audio_tower(self, model: torch.nn.Module) -> torch.nn.Module:
        return model.model.audio_tower

    def decoder(self, model: torch.nn.Module) -> torch.nn.Module:
        return model.model.language_model

    def encode(
        self, model: torch.nn.Module, features: torch.Tensor, mask: torch.Tensor
    ) -> list[torch.Tensor]:
        """Each chunk's encoder output over its real frames, as Qwen2AudioModel.forward computes it
        (the encoder always reads the padded 30 s window, masked)."""
        from transformers.masking_utils import create_bidirectional_mask

        tower = model.model.audio_tower
        feat_lengths, out_lengths = tower._get_feat_extract_output_lengths(mask.sum(-1))
        width = (features.shape[-1] - 2) // 2 + 1
        frames = (torch.arange(width, device=features.device)[None, :] < feat_lengths[:, None]).long()
        attention = create_bidirectional_mask(
            config=tower.config,
            inputs_embeds=torch.zeros(len(features), width, 1, dtype=features.dtype, device=features.device),
            attention_mask=frames,
        )
        hidden = tower(features.to(tower.conv1.weight.dtype), attention_mask=attention).last_hidden_state
        return [hidden[i, : out_lengths[i]] for i in range(len(features))]

    def project(self, model: torch.nn.Module, encoded: torch.Tensor) -> torch.Tensor:
        return model.model.multi_modal_projector(encoded)

    def audio_tokens_per_item(self, seconds: float, feature_extractor_config: dict) -> int:
        # Every item is padded to nb_max_frames mel frames; a conv (stride 2) and a pool (stride 2)
        # leave a quarter of them as audio tokens, whatever the item's length.
        return int(feature_extractor_config.get("nb_max_frames", 3000)) // 4

    def build_tiny(self, out_dir: Path, cfg) -> None:
        from transformers import (
            GenerationConfig,
            Qwen2AudioConfig,
            Qwen2AudioForConditionalGeneration,
            Qwen2AudioProcessor,
            WhisperFeatureExtractor,
        )

        tokenizer = train_tokenizer(cfg.vocab_size, SPECIAL_TOKENS, CHAT_TEMPLATE)
        processor = Qwen2AudioProcessor(
            feature_extractor=WhisperFeatureExtractor(feature_size=128, sampling_rate=16000, chunk_length=30),
            tokenizer=tokenizer,
            chat_template=CHAT_TEMPLATE,
        )
        config = Qwen2AudioConfig(
            audio_config={
                "d_model": cfg.audio_d_model,
                "encoder_layers": cfg.audio_layers,
                "encoder_attention_heads": cfg.audio_heads,
                "encoder_ffn_dim": cfg.audio_d_model * 4,
                "num_mel_bins": 128,
                "max_source_positions": 1500,
            },
            text_config={
                "model_type": "qwen2",
                "vocab_size": len(tokenizer),
                "hidden_size": cfg.text_hidden,
                "intermediate_size": cfg.text_intermediate,
                "num_hidden_layers": cfg.text_layers,
                "num_attention_heads": cfg.text_heads,
                "num_key_value_heads": cfg.text_kv_heads,
                "max_position_embeddings": 4096,
                "tie_word_embeddings": False,
                "bos_token_id": tokenizer.convert_tokens_to_ids("<|endoftext|>"),
                "eos_token_id": tokenizer.convert_tokens_to_ids("<|im_end|>"),
            },
            audio_token_index=tokenizer.convert_tokens_to_ids("<|AUDIO|>"),
        )
        torch.manual_seed(cfg.seed)
        model = Qwen2AudioForConditionalGeneration(config)
        model.generation_config = GenerationConfig(
            eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id
        )
        self.save(model, out_dir)
        processor.save_pretrained(out_dir)
