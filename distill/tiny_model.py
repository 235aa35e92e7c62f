"""Build a tiny random Qwen2-Audio that vLLM loads: the real model classes, only small.

Nothing can be downloaded at run time, so the tokenizer is a byte-level BPE trained here on the
synthetic tasks' texts, the feature extractor is a WhisperFeatureExtractor with Qwen2-Audio's
settings, and the weights are random.
"""

from __future__ import annotations

import shutil
import tempfile
from pathlib import Path

from distill.config import TinyModelConfig

SPECIAL_TOKENS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<|AUDIO|>", "<|audio_bos|>", "<|audio_eos|>"]
# Added as ordinary (non-special) tokens so that decoding with skip_special_tokens keeps them.
THINK_TOKENS = ["<think>", "</think>"]

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


def _train_tokenizer(texts: list[str], vocab_size: int):
    from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=SPECIAL_TOKENS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
    )
    tok.train_from_iterator(texts, trainer=trainer)
    tok.add_tokens([AddedToken(t, special=False, normalized=False) for t in THINK_TOKENS])
    return PreTrainedTokenizerFast(
        tokenizer_object=tok,
        eos_token="<|im_end|>",
        pad_token="<|endoftext|>",
        unk_token=None,
        chat_template=CHAT_TEMPLATE,
        model_max_length=32768,
    )


def build_tiny_model(out_dir: str | Path, cfg: TinyModelConfig | None = None) -> Path:
    """Write a tiny random Qwen2-Audio (weights, config, processor, chat template) to `out_dir`.

    The folder is written under a temp name and renamed, so a crash never leaves half a model.
    """
    import torch
    from transformers import (
        GenerationConfig,
        Qwen2AudioConfig,
        Qwen2AudioForConditionalGeneration,
        Qwen2AudioProcessor,
        WhisperFeatureExtractor,
    )

    from data_pipelines.synthetic import corpus

    cfg = cfg or TinyModelConfig()
    out_dir = Path(out_dir)
    if out_dir.exists() and any(out_dir.iterdir()):
        raise FileExistsError(f"{out_dir}: not empty; a tiny model is only built into a new or empty folder")
    texts = corpus() + [
        "You are a helpful assistant.", "You are a helpful assistant that listens carefully and reasons about sounds.",
        "system", "user", "assistant", "Audio 1: ",
    ]
    tokenizer = _train_tokenizer(texts, cfg.vocab_size)
    feature_extractor = WhisperFeatureExtractor(feature_size=128, sampling_rate=16000, chunk_length=30)
    processor = Qwen2AudioProcessor(
        feature_extractor=feature_extractor, tokenizer=tokenizer, chat_template=CHAT_TEMPLATE
    )
    vocab = len(tokenizer)
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
            "vocab_size": vocab,
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
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=out_dir.parent, prefix=f".{out_dir.name}."))
    try:
        save_for_serving(model, tmp)
        processor.save_pretrained(tmp)
        if out_dir.exists():
            out_dir.rmdir()  # empty, checked above
        tmp.rename(out_dir)
    except OSError:
        shutil.rmtree(tmp, ignore_errors=True)
        if not (out_dir / "config.json").exists():
            raise
        # Another process (a parallel array task) finished the same build first: use its model.
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out_dir


# transformers 5.x module names -> the original Qwen2-Audio checkpoint layout, which vLLM loads.
_SERVING_PREFIXES = (
    ("model.audio_tower.", "audio_tower."),
    ("model.multi_modal_projector.", "multi_modal_projector."),
    ("model.language_model.", "language_model.model."),
    ("lm_head.", "language_model.lm_head."),
)


def serving_state_dict(state_dict: dict) -> dict:
    """Rename a transformers-5 Qwen2-Audio state dict to the checkpoint layout vLLM loads.

    transformers' own reverse conversion on save can write `language_model.model.model.*` keys
    (ENVIRONMENT.md), which vLLM rejects, so the mapping is spelled out here.
    """
    out = {}
    for key, value in state_dict.items():
        for native, original in _SERVING_PREFIXES:
            if key.startswith(native):
                key = original + key[len(native):]
                break
        out[key] = value
    return out


def save_for_serving(model, out_dir: str | Path, state_dict: dict | None = None) -> None:
    """save_pretrained with weights in the checkpoint layout vLLM loads (transformers reads it too)."""
    state = serving_state_dict(state_dict if state_dict is not None else model.state_dict())
    model.save_pretrained(out_dir, state_dict=state, safe_serialization=True, save_original_format=False)
