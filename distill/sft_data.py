"""SFT examples: (audio, chat prompt, completion) rows, tokenized the way the sampler saw them.

A row is `{"id", "audio", "audio_sha256" (optional), "prompt", "completion", "weight" (optional,
default 1: the filter down-weights traces of items answerable from text)}`: `prompt` is the
rendered chat text with one audio placeholder per audio chunk, `completion` the assistant text
from `<think>` on. Audio comes from the run's audio cache, as the sampler saw it. The prompt is tokenized
with the audio (the processor expands the placeholder), the completion on its own, and the two
are concatenated, as vLLM saw them; the completion is re-tokenized from its text, which for a
byte-level BPE gives the sampled ids in all but rare merge cases.
"""

from __future__ import annotations

from pathlib import Path

import torch

from data_pipelines.audio_cache import AudioCache
from data_pipelines.items import Item
from distill.io import read_jsonl_numbered
from distill.prompting import THINK_CLOSE, item_prompt, think_close_token_id

IGNORE = -100


def cold_start_rows(items: list[Item], tokenizer, system_prompt: str, cache: AudioCache) -> list[dict]:
    """SFT rows from the items' reference traces (items without one get an empty think block)."""
    rows = []
    for item in items:
        completion = item.reasoning or f"<think>\n\n{THINK_CLOSE}\n{item.answer}"
        chunks = len(cache.chunks(item.audio, item.audio_sha256))
        rows.append({"id": item.id, "audio": item.audio, "audio_sha256": item.audio_sha256,
                     "prompt": item_prompt(tokenizer, item, system_prompt, chunks), "completion": completion})
    return rows


def load_rows(paths: list[str | Path]) -> list[dict]:
    rows = []
    for path in paths:
        for lineno, row in read_jsonl_numbered(path):
            missing = [k for k in ("audio", "prompt", "completion") if not isinstance(row.get(k), str)]
            if missing:
                raise ValueError(f"{path}:{lineno}: SFT row lacks string field(s) {', '.join(missing)}")
            weight = row.get("weight", 1.0)
            if isinstance(weight, bool) or not isinstance(weight, int | float) or not 0 <= weight <= 1:
                raise ValueError(f"{path}:{lineno}: SFT row weight {weight!r}: must be a number in [0, 1]")
            rows.append(row)
    if not rows:
        raise ValueError(f"{', '.join(map(str, paths))}: no SFT rows")
    return rows


def split_prefix(prompt: str, completion: str, generation_prefix: str) -> tuple[str, str]:
    """Move the generation prefix from the completion to the prompt.

    The sampler pre-fills `<think>\n`, so the model never generates it; trained as a target, the
    prefix teaches the model to open a second think block after the pre-filled one.
    """
    if generation_prefix and completion.startswith(generation_prefix):
        return prompt + generation_prefix, completion[len(generation_prefix):]
    return prompt, completion


class SFTDataset(torch.utils.data.Dataset):
    """Tokenizes lazily: audio features are large (128 x 3000 floats per item for Qwen2-Audio)."""

    def __init__(self, rows: list[dict], processor, cache: AudioCache, max_seq_len: int, answer_loss_weight: float,
                 generation_prefix: str = ""):
        self.rows = rows
        self.cache = cache
        self.generation_prefix = generation_prefix
        self.processor = processor
        self.tokenizer = processor.tokenizer
        self.max_seq_len = max_seq_len
        self.answer_loss_weight = answer_loss_weight
        self.sample_rate = processor.feature_extractor.sampling_rate
        if cache.policy.sample_rate != self.sample_rate:
            raise ValueError(f"data.sample_rate={cache.policy.sample_rate} but the model's feature extractor expects "
                             f"{self.sample_rate} Hz; set data.sample_rate={self.sample_rate}")
        self.think_close_id = think_close_token_id(self.tokenizer)
        if answer_loss_weight != 1.0 and self.think_close_id is None:
            raise ValueError(f"answer_loss_weight={answer_loss_weight} needs {THINK_CLOSE} to be one token in this "
                             "tokenizer; add it as a token or set the weight to 1")
        self.audio_token = processor.audio_token

    def __len__(self) -> int:
        return len(self.rows)

    def __getitem__(self, index: int) -> dict:
        row = self.rows[index]
        prompt, completion = split_prefix(row["prompt"], row["completion"], self.generation_prefix)
        if self.audio_token in completion:
            raise ValueError(f"SFT row {row.get('id', index)!r}: the completion contains the audio placeholder "
                             f"{self.audio_token}; the filter's control-token check should have rejected it")
        audio = self.cache.chunks(row["audio"], row.get("audio_sha256"))
        if prompt.count(self.audio_token) != len(audio):
            raise ValueError(f"SFT row {row.get('id', index)!r}: the prompt has {prompt.count(self.audio_token)} audio "
                             f"placeholder(s) but the audio gives {len(audio)} chunk(s)")
        enc = self.processor(text=[prompt], audio=audio, sampling_rate=self.sample_rate, return_tensors="pt")
        prompt_ids = enc["input_ids"][0].tolist()
        completion_ids = self.tokenizer(completion + self.tokenizer.eos_token, add_special_tokens=False)["input_ids"]
        if len(prompt_ids) + len(completion_ids) > self.max_seq_len:
            # Truncation would cut the end-of-turn token (or the audio placeholders): refuse instead.
            raise ValueError(f"SFT row {row.get('id', index)!r}: {len(prompt_ids)} prompt + {len(completion_ids)} "
                             f"completion tokens exceed train.max_seq_len={self.max_seq_len}")
        ids = prompt_ids + completion_ids
        labels = [IGNORE] * len(prompt_ids) + completion_ids
        weights = [0.0] * len(prompt_ids)
        after_think = False
        for tok in completion_ids:
            weights.append(self.answer_loss_weight if after_think else 1.0)
            after_think = after_think or tok == self.think_close_id
        return {
            "input_ids": torch.tensor(ids),
            "labels": torch.tensor(labels),
            "weights": torch.tensor(weights),
            "row_weight": torch.tensor(float(row.get("weight", 1.0))),
            # One row per audio chunk; the model assigns them to the placeholders in order.
            "input_features": enc["input_features"],
            "feature_attention_mask": enc["feature_attention_mask"],
        }


def collate(batch: list[dict], pad_id: int) -> dict:
    """Right-pad token sequences; concatenate the audio chunks' features in row order."""
    longest = max(len(x["input_ids"]) for x in batch)

    def pad(key: str, value: float) -> torch.Tensor:
        return torch.stack(
            [torch.cat([x[key], torch.full((longest - len(x[key]),), value, dtype=x[key].dtype)]) for x in batch]
        )

    ids = pad("input_ids", pad_id)
    mask = torch.stack(
        [torch.cat([torch.ones(len(x["input_ids"]), dtype=torch.long),
                    torch.zeros(longest - len(x["input_ids"]), dtype=torch.long)]) for x in batch]
    )
    return {
        "input_ids": ids,
        "attention_mask": mask,
        "labels": pad("labels", IGNORE),
        "weights": pad("weights", 0.0),
        "row_weights": torch.stack([x["row_weight"] for x in batch]),
        "input_features": torch.cat([x["input_features"] for x in batch]),
        "feature_attention_mask": torch.cat([x["feature_attention_mask"] for x in batch]),
    }


def weighted_loss(logits: torch.Tensor, labels: torch.Tensor, weights: torch.Tensor,
                  row_weights: torch.Tensor | None = None) -> torch.Tensor:
    """Next-token cross-entropy over completion tokens, each weighted (answer tokens may weigh more),
    each row scaled by its row weight. The normalizer leaves the row weights out, so a batch of
    down-weighted rows moves the model less instead of being rescaled back to full strength."""
    logits = logits[:, :-1].float()
    labels = labels[:, 1:]
    weights = weights[:, 1:] * (labels != IGNORE)
    ce = torch.nn.functional.cross_entropy(
        logits.reshape(-1, logits.size(-1)), labels.clamp(min=0).reshape(-1), reduction="none"
    ).view_as(labels)
    scaled = weights if row_weights is None else weights * row_weights[:, None]
    return (ce * scaled).sum() / weights.sum().clamp(min=1e-8)
