"""The trainer's side of an RL step: the sampled groups as training rows (the prompt as the
processor expands its audio, then the very token ids the engine sampled), so the trainer scores
what was sampled and not a re-tokenization (the log-probabilities themselves: the training model's
forward with a temperature, training/loss.py token_logprobs)."""

from __future__ import annotations

from collections.abc import Callable

import numpy as np

from distill.rl.rollout import Group
from distill.training.packing import IGNORE, Sample


class PromptIds:
    """Token ids of the prompts, with the processor's audio expansion, each computed once per
    prompt and audio (every step asks again for the items it samples)."""

    def __init__(self, processor, serving_audio: Callable[[list[np.ndarray]], list[np.ndarray]]):
        self.processor = processor
        self.serving_audio = serving_audio
        self.rate = processor.feature_extractor.sampling_rate
        self.ids: dict[tuple[str, str], list[int]] = {}

    def __call__(self, prompt: str, audio: list[np.ndarray], key: str) -> list[int]:
        if (prompt, key) not in self.ids:
            enc = self.processor(
                text=[prompt], audio=self.serving_audio(audio), sampling_rate=self.rate, return_tensors="pt"
            )
            self.ids[(prompt, key)] = enc["input_ids"][0].tolist()
        return self.ids[(prompt, key)]


def group_samples(groups: list[Group], prompt_ids: PromptIds) -> list[Sample]:
    """One training sample per sampled completion, group after group."""
    samples = []
    for g in groups:
        key = g.item.audio_sha256 or g.item.audio
        ids = prompt_ids(g.request.prompt, g.request.audio, key)
        audio = prompt_ids.serving_audio(g.request.audio)
        for out in g.completions:
            completion = list(out.token_ids)
            samples.append(
                Sample(
                    input_ids=ids + completion,
                    labels=[IGNORE] * len(ids) + completion,
                    weights=[0.0] * len(ids) + [1.0] * len(completion),
                    row_weight=1.0,
                    audio=audio,
                    audio_keys=[f"{key}#{i}" for i in range(len(audio))],
                )
            )
    return samples
