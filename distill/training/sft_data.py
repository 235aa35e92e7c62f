"""SFT examples: (audio, chat prompt, completion) rows, tokenized the way the sampler saw them.

A row is `{"id", "audio" (a path, or null for a text-only row), "audio_sha256" (optional),
"prompt", "completion", "weight" (optional, default 1: the filter down-weights traces of items
answerable from text)}`: `prompt` is the rendered chat text with one audio placeholder per audio
chunk, `completion` the assistant text from `<think>` on. Audio comes from the run's audio cache,
as the sampler saw it. The prompt is tokenized with the audio (the processor expands the
placeholder), the completion on its own, and the two are concatenated, as vLLM saw them; the
completion is re-tokenized from its text, which for a byte-level BPE gives the sampled ids in all
but rare merge cases.

Every row is tokenized up front (prompts once per distinct prompt and audio), so the batch plan
knows every length; the audio features are left to the model side, which computes them only for
clips its encoder cache does not hold.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import numpy as np

from data_pipelines.audio_cache import AudioCache
from distill.core.files import read_jsonl_numbered
from distill.core.prompts import THINK_CLOSE
from distill.models.tokens import think_close_token_id
from distill.training.packing import IGNORE, Sample


def load_rows(paths: list[str | Path]) -> list[dict]:
    rows = []
    for path in paths:
        for lineno, row in read_jsonl_numbered(path):
            missing = [k for k in ("prompt", "completion") if not isinstance(row.get(k), str)]
            if not isinstance(row.get("audio"), str | None):
                missing.append("audio")
            if missing:
                raise ValueError(f"{path}:{lineno}: SFT row lacks string field(s) {', '.join(missing)}")
            weight = row.get("weight", 1.0)
            if isinstance(weight, bool) or not isinstance(weight, int | float) or not 0 <= weight <= 1:
                raise ValueError(f"{path}:{lineno}: SFT row weight {weight!r}: must be a number in [0, 1]")
            rows.append({**row, "where": f"{path}:{lineno}"})
    if not rows:
        raise ValueError(f"{', '.join(map(str, paths))}: no SFT rows")
    return rows


def split_prefix(prompt: str, completion: str, generation_prefix: str) -> tuple[str, str]:
    """Move the generation prefix from the completion to the prompt.

    The sampler pre-fills `<think>\n`, so the model never generates it; trained as a target, the
    prefix teaches the model to open a second think block after the pre-filled one.
    """
    if generation_prefix and completion.startswith(generation_prefix):
        return prompt + generation_prefix, completion[len(generation_prefix) :]
    return prompt, completion


class SFTDataset:
    """Tokenized SFT rows; `lengths[i]` is row i's token count, `self[i]` its Sample."""

    def __init__(
        self,
        rows: list[dict],
        processor,
        cache: AudioCache,
        max_seq_len: int,
        answer_loss_weight: float,
        generation_prefix: str = "",
        serving_audio: Callable[[list[np.ndarray]], list[np.ndarray]] | None = None,
    ):
        self.rows = rows
        self.cache = cache
        # The waveforms as the serving engine prepares them (Family.serving_audio), so that the
        # placeholder counts and the encoder see what vLLM sees.
        self.serving_audio = serving_audio or (lambda chunks: chunks)
        self.processor = processor
        self.tokenizer = processor.tokenizer
        self.sample_rate = processor.feature_extractor.sampling_rate
        if cache.policy.sample_rate != self.sample_rate:
            raise ValueError(
                f"data.sample_rate={cache.policy.sample_rate} but the model's feature extractor expects "
                f"{self.sample_rate} Hz; set data.sample_rate={self.sample_rate}"
            )
        self.think_close_id = think_close_token_id(self.tokenizer)
        if answer_loss_weight != 1.0 and self.think_close_id is None:
            raise ValueError(
                f"answer_loss_weight={answer_loss_weight} needs {THINK_CLOSE} to be one token in this "
                "tokenizer; add it as a token or set the weight to 1"
            )
        self.audio_token = processor.audio_token
        self.answer_loss_weight = answer_loss_weight
        prompts: dict[tuple[str, str | None], list[int]] = {}
        clips: dict[tuple[str | None, str | None], str | None] = {}
        self.tokens: list[tuple[list[int], list[int]]] = []
        self.clip_keys: list[str | None] = []
        for index, row in enumerate(rows):
            prompt, completion = split_prefix(row["prompt"], row["completion"], generation_prefix)
            # Errors name the row's file and line (rows from load_rows and the mix sources carry them).
            name = (
                f"{row['where']}: SFT row {row.get('id')!r}"
                if row.get("where")
                else f"SFT row {row.get('id', index)!r}"
            )
            if self.audio_token in completion:
                raise ValueError(
                    f"{name}: the completion contains the audio placeholder "
                    f"{self.audio_token}; the filter's control-token check should have rejected it"
                )
            where = (row["audio"], row.get("audio_sha256"))
            if where not in clips:
                # The clip's content hash keys its encoder output, wherever the file lies.
                clips[where] = None if row["audio"] is None else self.cache.load(*where)[1]
            self.clip_keys.append(clips[where])
            key = (prompt, clips[where])
            if key not in prompts:
                prompts[key] = self._prompt_ids(prompt, row, name)
            completion_ids = self.tokenizer(completion + self.tokenizer.eos_token, add_special_tokens=False)[
                "input_ids"
            ]
            if len(prompts[key]) + len(completion_ids) > max_seq_len:
                # Truncation would cut the end-of-turn token (or the audio placeholders): refuse instead.
                raise ValueError(
                    f"{name}: {len(prompts[key])} prompt + {len(completion_ids)} completion "
                    f"tokens exceed train.max_seq_len={max_seq_len}"
                )
            self.tokens.append((prompts[key], completion_ids))
        self.lengths = [len(p) + len(c) for p, c in self.tokens]
        # Each row's summed target-token weight: what the loss of a whole optimizer step divides by.
        self.target_weights = [sum(self.completion_weights(c)) for _, c in self.tokens]

    def _prompt_ids(self, prompt: str, row: dict, name) -> list[int]:
        audio = self.chunks(row)
        if prompt.count(self.audio_token) != len(audio):
            raise ValueError(
                f"{name}: the prompt has {prompt.count(self.audio_token)} audio "
                f"placeholder(s) but the audio gives {len(audio)} chunk(s)"
            )
        if not audio:
            return self.tokenizer(prompt, add_special_tokens=False)["input_ids"]
        enc = self.processor(text=[prompt], audio=audio, sampling_rate=self.sample_rate, return_tensors="pt")
        return enc["input_ids"][0].tolist()

    def completion_weights(self, completion_ids: list[int]) -> list[float]:
        """Loss weight per completion token: 1 up to and with </think>, answer_loss_weight after."""
        weights, after_think = [], False
        for tok in completion_ids:
            weights.append(self.answer_loss_weight if after_think else 1.0)
            after_think = after_think or tok == self.think_close_id
        return weights

    def chunks(self, row: dict) -> list[np.ndarray]:
        return (
            []
            if row["audio"] is None
            else self.serving_audio(self.cache.chunks(row["audio"], row.get("audio_sha256")))
        )

    def __len__(self) -> int:
        return len(self.rows)

    def __getitem__(self, index: int) -> Sample:
        row = self.rows[index]
        prompt_ids, completion_ids = self.tokens[index]
        weights = [0.0] * len(prompt_ids) + self.completion_weights(completion_ids)
        audio = self.chunks(row)
        clip = self.clip_keys[index]
        return Sample(
            input_ids=prompt_ids + completion_ids,
            labels=[IGNORE] * len(prompt_ids) + completion_ids,
            weights=weights,
            row_weight=float(row.get("weight", 1.0)),
            audio=audio,
            audio_keys=[f"{clip}#{i}" for i in range(len(audio))],
        )
