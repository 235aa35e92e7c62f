"""The tokens a request must never generate (a family's audio markup), masked by a vLLM logits
processor: one tensor write for the whole batch per step. vLLM's own `bad_words` loops in Python
over every sequence and every word at every step (6% of sampling long traces, docs/benchmarks.md,
"Sampling"). A request names its banned token ids in `SamplingParams.extra_args[BANNED_KEY]`;
`open_engine` installs the processor on every engine distill opens, and `generate` refuses an
engine without it, so a ban cannot be silently ignored."""

from __future__ import annotations

import torch
from vllm import SamplingParams
from vllm.v1.sample.logits_processor import BatchUpdate, LogitsProcessor, process_dict_updates

BANNED_KEY = "distill_banned_token_ids"


def banned_ids(params: SamplingParams) -> tuple[int, ...] | None:
    """The token ids request `params` bans, or None."""
    return tuple((params.extra_args or {}).get(BANNED_KEY) or ()) or None


class BannedTokens(LogitsProcessor):
    """Sets the logits of each request's banned tokens to -inf (where vLLM applies `bad_words`,
    before penalties, temperature and top-p, so the samples are the ones `bad_words` gives)."""

    def __init__(self, vllm_config, device: torch.device, is_pin_memory: bool):
        self.device = device
        self.banned: dict[int, tuple[int, ...]] = {}  # batch row -> banned ids
        self.index: tuple[torch.Tensor, torch.Tensor] | None = None

    @classmethod
    def validate_params(cls, sampling_params: SamplingParams) -> None:
        ids = banned_ids(sampling_params)
        if ids and not all(isinstance(i, int) and i >= 0 for i in ids):
            raise ValueError(f"{BANNED_KEY}: token ids must be non-negative integers, got {ids!r}")

    def is_argmax_invariant(self) -> bool:
        return False  # a banned token may be the most likely one

    def update_state(self, batch_update: BatchUpdate | None) -> None:
        if process_dict_updates(self.banned, batch_update, lambda params, _, __: banned_ids(params)):
            rows = [row for row, ids in self.banned.items() for _ in ids]
            cols = [i for ids in self.banned.values() for i in ids]
            self.index = (
                (torch.tensor(rows, device=self.device), torch.tensor(cols, device=self.device))
                if rows
                else None
            )

    def apply(self, logits: torch.Tensor) -> torch.Tensor:
        if self.index is not None:
            logits[self.index] = float("-inf")
        return logits
