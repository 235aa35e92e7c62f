"""The trainer's side of an RL step: the sampled groups as training rows (the prompt as the
processor expands its audio, then the very token ids the engine sampled, so the trainer scores
what was sampled and not a re-tokenization), and the policy's log-probability of each sampled
token."""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
import torch
import torch.utils.checkpoint

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


def token_logprobs(
    hidden: torch.Tensor,
    head: Callable[[torch.Tensor], torch.Tensor],
    labels: torch.Tensor,
    temperature: float,
    chunk: int = 4096,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(log-probability of each target token under logits / temperature, the same at temperature 1
    detached (what vLLM reports, to compare), the target mask), each [rows, positions - 1]. The head
    runs on target positions only, `chunk` at a time, recomputed in the backward pass (the logits
    of a long trace over a 150k vocabulary would take gigabytes)."""
    hidden, labels = hidden[:, :-1], labels[:, 1:]
    targets = labels != IGNORE
    h, y = hidden[targets], labels[targets]

    def piece(h_part: torch.Tensor, y_part: torch.Tensor) -> torch.Tensor:
        logits = head(h_part).float()
        scaled = torch.log_softmax(logits / temperature, dim=-1).gather(1, y_part[:, None])[:, 0]
        raw = torch.log_softmax(logits.detach(), dim=-1).gather(1, y_part[:, None])[:, 0]
        return torch.stack([scaled, raw])

    parts = [
        torch.utils.checkpoint.checkpoint(piece, h[s : s + chunk], y[s : s + chunk], use_reentrant=False)
        for s in range(0, len(y), chunk)
    ]
    flat = torch.cat(parts, dim=1) if parts else hidden.new_zeros((2, 0), dtype=torch.float32)
    zeros = torch.zeros(targets.shape, dtype=torch.float32, device=hidden.device)
    logp = zeros.masked_scatter(targets, flat[0])
    raw = zeros.masked_scatter(targets, flat[1].detach())
    return logp, raw, targets
