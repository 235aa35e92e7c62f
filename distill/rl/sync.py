"""The trainer's weights pushed into the live vLLM engine beside it (colocated, as TRL and verl
run RL), so the next rollout samples from the policy just updated.

vLLM 0.32 on CPU has no weight-transfer backend (its ipc and NCCL engines need CUDA), so the
weights go through the worker's `reload_weights` with the tensors themselves (`collective_rpc`; in
the engine's own process when it runs inline, as distill's colocated engine does), named as the
export writes them (the family's `checkpoint_state_dict`). The model's own `load_weights`, which
TRL's colocate mode calls, fails on CPU once vLLM has repacked the weights for oneDNN. Everything
the engine computed with the old weights is then dropped: the prefix cache
(key/values of the old weights), the encoder cache (audio embeddings: the projector trains) and
the processed-audio cache. The engine carries the policy step it holds (`POLICY_STEP`), and a
rollout refuses an engine whose step is not the trainer's: a stale policy cannot sample.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Iterable

import torch

POLICY_STEP = "distill_policy_step"


def _not_rotary(record: logging.LogRecord) -> bool:
    # Rotary embeddings hold a computed cache, no checkpoint weight: vLLM keeps it and says so.
    return not record.getMessage().startswith("RotaryEmbedding: Failed to load weights")


# Every push logs these, twice a step per rank; the push's own seconds go to the RL log instead.
logging.getLogger("vllm.model_executor.model_loader.reload.inplace").setLevel(logging.WARNING)
logging.getLogger("vllm.v1.core.block_pool").setLevel(logging.WARNING)
logging.getLogger("vllm.model_executor.model_loader.reload.layerwise").addFilter(_not_rotary)


class StalePolicyError(RuntimeError):
    """The engine holds other weights than the policy the trainer is at."""


def push_weights(llm, weights: Iterable[tuple[str, torch.Tensor]], step: int) -> float:
    """Load `weights` (checkpoint names, as family.checkpoint_state_dict gives them) into `llm`,
    drop the caches of the old weights, and record `step` as the engine's policy step; seconds."""
    start = time.perf_counter()
    setattr(llm, POLICY_STEP, None)  # an interrupted load leaves no step to trust
    # In place through vLLM's layerwise reload, which re-runs what loading does after the
    # weights are read: the model's own load_weights would write into tensors the CPU backend has
    # already repacked (for oneDNN) and fails there.
    llm.collective_rpc(
        "reload_weights", kwargs={"weights_iterator": list(weights), "is_checkpoint_format": True}
    )
    llm.reset_prefix_cache()
    llm.llm_engine.reset_encoder_cache()
    llm.reset_mm_cache()
    setattr(llm, POLICY_STEP, step)
    return time.perf_counter() - start


def check_policy(llm, step: int) -> None:
    """Raise unless the engine holds the weights of policy step `step`."""
    held = getattr(llm, POLICY_STEP, None)
    if held != step:
        raise StalePolicyError(
            f"the rollout engine holds policy step {held}, the trainer is at step {step}: "
            "push the weights before sampling"
        )
