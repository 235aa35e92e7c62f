"""Audio Flamingo 3 (AudioFlamingo3ForConditionalGeneration): a Whisper-style encoder with a
2x average pool over 30 s windows, a two-layer MLP projector, and a Qwen2.5 language model with
1-D RoPE.

Long audio is cut into 30 s windows (at most 20: 10 minutes); the encoder reads each window
padded to 30 s, and one `<sound>` placeholder per item stands for the real frames of all its
windows in order. One audio item per prompt: the processor refuses more than one per text and
vLLM supports one. The encoder cannot read a shorter input: its forward adds the whole table of
1500 positions, so every window is padded to 3000 mel frames, as the processor does.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import ClassVar

import numpy as np
import torch

from distill.models.family import Family
from distill.models.tokenizer import train_tokenizer

AUDIO_TOKEN = "<sound>"
# Qwen2.5's special tokens (its tokenizer marks these special; its tool and fill-in-the-middle
# tokens are ordinary added tokens), then the audio placeholder AF3 adds.
SPECIAL_TOKENS = [
    "<|endoftext|>",
    "<|im_start|>",
    "<|im_end|>",
    "<|object_ref_start|>",
    "<|object_ref_end|>",
    "<|box_start|>",
    "<|box_end|>",
    "<|quad_start|>",
    "<|quad_end|>",
    "<|vision_start|>",
    "<|vision_end|>",
    "<|vision_pad|>",
    "<|image_pad|>",
    "<|video_pad|>",
    AUDIO_TOKEN,
]
# The processor's defaults (AudioFlamingo3Processor.max_audio_len): 20 windows of 30 s.
MAX_AUDIO_SECONDS = 600.0
# The feature extractor settings nvidia/audio-flamingo-3-hf publishes (WhisperFeatureExtractor's
# defaults with 128 mel bins), also the fallbacks when a config leaves one out.
FEATURE_EXTRACTOR = {
    "feature_size": 128,
    "sampling_rate": 16000,
    "hop_length": 160,
    "chunk_length": 30,
    "return_attention_mask": True,
}

# The chat template published with nvidia/audio-flamingo-3-hf: `processor_chat_template` in
# transformers' src/transformers/models/audioflamingo3/convert_audioflamingo3_to_hf.py, the script
# that wrote that repository (its rendering is pinned by test_chat_template in
# tests/models/audioflamingo3/test_processing_audioflamingo3.py). One `<sound>` per message, before
# its text, however many audio parts the message has.
CHAT_TEMPLATE = (
    "{% if messages[0]['role'] != 'system' %}"
    "<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n"
    "{% endif %}"
    "{% for m in messages if m['content'] is not none %}"
    "<|im_start|>{{ m['role'] }}\n"
    "{% if m['content'] is string %}"
    "{{ m['content'] }}"
    "{% else %}"
    "{% set audio = namespace(found=False) %}"
    "{% set text_buf = namespace(v='') %}"
    "{% for c in m['content'] %}"
    "{% if c.get('type') == 'audio' or 'audio' in c %}"
    "{% set audio.found = True %}"
    "{% elif c.get('type') == 'text' or 'text' in c %}"
    "{% set text_buf.v = text_buf.v + c['text'] %}"
    "{% endif %}"
    "{% endfor %}"
    "{% if audio.found %}{{ '<sound>' }}{% endif %}{{ text_buf.v }}"
    "{% endif %}"
    "<|im_end|>\n"
    "{% endfor %}"
    "{% if add_generation_prompt %}"
    "<|im_start|>assistant\n"
    "{% endif %}"
)

# transformers-5 module names -> the checkpoint layout vLLM 0.32's AudioFlamingo3ForConditionalGeneration
# loads (its AutoWeightsLoader has no name mapper: audio_tower, multi_modal_projector, and a
# Qwen2ForCausalLM under language_model). transformers maps these names back when it loads.
CHECKPOINT_PREFIXES = (
    ("model.audio_tower.", "audio_tower."),
    ("model.multi_modal_projector.", "multi_modal_projector."),
    ("model.language_model.", "language_model.model."),
    ("lm_head.", "language_model.lm_head."),
)


def post_pool_length(frames: int | torch.Tensor) -> int | torch.Tensor:
    """Encoder outputs for `frames` mel frames: a stride-2 conv, then a stride-2 average pool."""
    return ((frames - 1) // 2 + 1 - 2) // 2 + 1


class AudioFlamingo3(Family):
    name = "audio_flamingo3"
    title = "Audio Flamingo 3"
    model_types = ("audioflamingo3",)
    parts: ClassVar[dict[str, tuple[str, ...]]] = {
        "audio_encoder": ("model.audio_tower.",),
        "projector": ("model.multi_modal_projector.",),
        "language_model": ("model.language_model.", "lm_head."),
    }
    lora_scope = r"model\.language_model\..*\.({})"
    max_audio_seconds = MAX_AUDIO_SECONDS
    max_audio_items = 1

    # --- loading and saving -------------------------------------------------------------
    def load_for_training(self, model_dir: str | Path, dtype: torch.dtype, attention: str) -> torch.nn.Module:
        """AudioFlamingo3ForConditionalGeneration from `model_dir`."""
        from transformers import AudioFlamingo3ForConditionalGeneration

        return AudioFlamingo3ForConditionalGeneration.from_pretrained(
            model_dir, dtype=dtype, attn_implementation=attention
        )

    def checkpoint_state_dict(self, state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """Rename transformers-5 keys to the layout vLLM loads (CHECKPOINT_PREFIXES); others stay."""
        return self.renamed(state, CHECKPOINT_PREFIXES)

    def build_tiny(self, out_dir: Path, cfg) -> None:
        """A tiny random AF3 with the real classes, tokens, processor and chat template."""
        model, processor = self._tiny(cfg)
        self.save(model, out_dir)
        processor.save_pretrained(out_dir)

    def max_item_seconds(self, feature_extractor_config: dict) -> float:
        # Long audio is split into windows of chunk_length, up to max_audio_seconds in all.
        return self.max_audio_seconds

    def _tiny(self, cfg):
        """(model, processor) of the tiny random AF3 that cfg (a TinyModelConfig) sizes."""
        from transformers import (
            AudioFlamingo3Config,
            AudioFlamingo3ForConditionalGeneration,
            AudioFlamingo3Processor,
            GenerationConfig,
            WhisperFeatureExtractor,
        )

        tokenizer = train_tokenizer(cfg.vocab_size, SPECIAL_TOKENS, CHAT_TEMPLATE)
        processor = AudioFlamingo3Processor(
            feature_extractor=WhisperFeatureExtractor(**FEATURE_EXTRACTOR),
            tokenizer=tokenizer,
            chat_template=CHAT_TEMPLATE,
            audio_token=AUDIO_TOKEN,
            max_audio_len=int(MAX_AUDIO_SECONDS),
        )
        ids = {
            "bos_token_id": tokenizer.convert_tokens_to_ids("<|endoftext|>"),
            "eos_token_id": tokenizer.eos_token_id,
            "pad_token_id": tokenizer.pad_token_id,
        }
        config = AudioFlamingo3Config(
            audio_config={
                "hidden_size": cfg.audio_d_model,
                "num_hidden_layers": cfg.audio_layers,
                "num_attention_heads": cfg.audio_heads,
                "intermediate_size": cfg.audio_d_model * 4,
                # 1500 positions: a 30 s window's 3000 mel frames after the stride-2 conv.
                "num_mel_bins": FEATURE_EXTRACTOR["feature_size"],
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
                **ids,
            },
            audio_token_id=tokenizer.convert_tokens_to_ids(AUDIO_TOKEN),
        )
        torch.manual_seed(cfg.seed)
        model = AudioFlamingo3ForConditionalGeneration(config)
        model.generation_config = GenerationConfig(**ids)
        return model, processor

    # --- the training forward -----------------------------------------------------------
    def audio_tower(self, model: torch.nn.Module) -> torch.nn.Module:
        return model.model.audio_tower

    def decoder(self, model: torch.nn.Module) -> torch.nn.Module:
        """The Qwen2 body (Qwen2Model): inputs_embeds and position ids in, hidden states out."""
        return model.model.language_model

    def features(self, feature_extractor, chunks: list[np.ndarray]) -> tuple[torch.Tensor, torch.Tensor]:
        """Features of each audio item as the processor makes them: cut to the first
        max_audio_seconds, split into 30 s windows, each padded to 3000 frames. Laid out per item,
        not per window as the processor does: [items, mel, windows * 3000] features and
        [items, windows * 3000] mask, an item with fewer windows padded with empty ones (mask 0)."""
        counts = [len(self._windows(feature_extractor, chunk)) for chunk in chunks]
        flat = self.processor_audio_inputs(feature_extractor, chunks)
        flat_features, flat_mask = flat["input_features"], flat["input_features_mask"]
        features = flat_features.new_zeros(len(chunks), max(counts), *flat_features.shape[1:])
        mask = flat_mask.new_zeros(len(chunks), max(counts), flat_mask.shape[-1])
        start = 0
        for i, count in enumerate(counts):
            features[i, :count] = flat_features[start : start + count]
            mask[i, :count] = flat_mask[start : start + count]
            start += count
        return features.permute(0, 2, 1, 3).flatten(2), mask.flatten(1)

    def processor_audio_inputs(self, feature_extractor, chunks: list[np.ndarray]) -> dict[str, torch.Tensor]:
        """What AudioFlamingo3Processor gives the model's forward for these items: the windows of
        all items in order, each padded to 30 s, and their mask as `input_features_mask`."""
        windows = [w for chunk in chunks for w in self._windows(feature_extractor, chunk)]
        enc = feature_extractor(
            windows,
            sampling_rate=feature_extractor.sampling_rate,
            return_attention_mask=True,
            padding="max_length",
            return_tensors="pt",
        )
        return {"input_features": enc["input_features"], "input_features_mask": enc["attention_mask"]}

    def _windows(self, feature_extractor, audio: np.ndarray) -> list[np.ndarray]:
        """The item's windows, as AudioFlamingo3Processor._process_audio cuts them (one at least)."""
        size = feature_extractor.n_samples
        audio = audio[: int(self.max_audio_seconds * feature_extractor.sampling_rate)]
        return [audio[start : start + size] for start in range(0, max(len(audio), 1), size)]

    def encode(
        self, model: torch.nn.Module, features: torch.Tensor, mask: torch.Tensor
    ) -> list[torch.Tensor]:
        """Each item's encoder output over the real frames of its windows, in order (what
        AudioFlamingo3Model.get_audio_features keeps, before the projector). The encoder runs on
        the windows that hold audio only, each as its own row, as in the model's forward."""
        tower = model.model.audio_tower
        width = 2 * tower.config.max_source_positions  # mel frames of one window (the conv halves them)
        windows = features.unflatten(-1, (-1, width)).transpose(1, 2).flatten(0, 1)
        window_mask = mask.unflatten(-1, (-1, width)).flatten(0, 1)
        real = window_mask.sum(-1) > 0
        hidden = tower(
            windows[real].to(tower.conv1.weight.dtype), input_features_mask=window_mask[real]
        ).last_hidden_state
        lengths = post_pool_length(window_mask[real].sum(-1).long())
        frames = torch.cat([h[:n] for h, n in zip(hidden, lengths.tolist(), strict=True)])
        per_window = torch.zeros(len(real), dtype=torch.long).masked_scatter(real.cpu(), lengths.cpu())
        return list(frames.split(per_window.view(len(features), -1).sum(-1).tolist()))

    def project(self, model: torch.nn.Module, encoded: torch.Tensor) -> torch.Tensor:
        """The multi-modal projector (linear, GELU, linear) on encoder outputs."""
        return model.model.multi_modal_projector(encoded)

    def audio_tokens_per_item(self, seconds: float, feature_extractor_config: dict) -> int:
        """`<sound>` placeholders for an item of `seconds`, as the processor counts them: the
        post-pool length of the real mel frames of all its windows (25 per second at 16 kHz;
        750 per full window), the item cut at max_audio_seconds."""
        fe = {**FEATURE_EXTRACTOR, **feature_extractor_config}
        rate, hop = fe["sampling_rate"], fe["hop_length"]
        window = rate * fe["chunk_length"]
        samples = min(math.ceil(seconds * rate), int(self.max_audio_seconds * rate))
        full, rest = divmod(samples, window)
        return post_pool_length(full * math.ceil(window / hop) + math.ceil(rest / hop))

    def markup_tokens(self, tokenizer) -> tuple[str, ...]:
        """`<sound>`: AF3's only audio marker (it has no audio begin/end tokens)."""
        return (AUDIO_TOKEN,)
