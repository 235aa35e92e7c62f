"""The distributed set-up of training: accelerate with DeepSpeed ZeRO, the config DeepSpeed gets,
bounded waits for peers, and how a lost peer is recognised."""

from __future__ import annotations

import json
import os
import sys
from collections.abc import Callable
from datetime import timedelta
from pathlib import Path
from typing import NoReturn

from distill.core.schema import ConfigError
from distill.training.config import TrainConfig
from distill.training.launch import mixed_precision, use_cuda

DEEPSPEED_CONFIGS = Path(__file__).resolve().parents[2] / "configs" / "deepspeed"


def deepspeed_config(tcfg: TrainConfig, world: int, hidden_size: int) -> dict:
    """The DeepSpeed config: train.deepspeed_config, or configs/deepspeed/zero{2,3}.json for
    train.zero_stage, with every "auto" filled from the train config (so accelerate and DeepSpeed
    agree on batch sizes and precision) and the optimizer offloaded when asked."""
    path = (
        Path(tcfg.deepspeed_config)
        if tcfg.deepspeed_config
        else DEEPSPEED_CONFIGS / f"zero{3 if tcfg.zero_stage == 3 else 2}.json"
    )
    config = json.loads(path.read_text())
    zero = config.setdefault("zero_optimization", {})
    if not tcfg.deepspeed_config:
        zero["stage"] = tcfg.zero_stage
    elif zero.get("stage") != tcfg.zero_stage:
        raise ConfigError(
            f"{path}: zero_optimization.stage={zero.get('stage')} but train.zero_stage="
            f"{tcfg.zero_stage}; make them agree"
        )
    if tcfg.offload_optimizer:
        zero["offload_optimizer"] = {"device": "cpu", "pin_memory": use_cuda(tcfg)}
    if zero["stage"] == 3:
        zero.setdefault(
            "stage3_gather_16bit_weights_on_model_save", True
        )  # the checkpoint needs whole weights
    # The batch plan, schedule and resume offsets follow the train config: a JSON may leave these
    # "auto" (filled here) but not set them otherwise.
    auto = {
        "train_micro_batch_size_per_gpu": tcfg.micro_batch_size,
        "gradient_accumulation_steps": tcfg.grad_accum,
        "train_batch_size": tcfg.micro_batch_size * tcfg.grad_accum * world,
        "gradient_clipping": tcfg.max_grad_norm,
    }
    for key, value in auto.items():
        if config.get(key, "auto") == "auto":
            config[key] = value
        elif config[key] != value:
            raise ConfigError(
                f'{path}: {key}={config[key]} disagrees with the train config ({value}); set it to "auto"'
            )
    precision = mixed_precision(tcfg)
    for key in ("bf16", "fp16"):
        if config.get(key, {}).get("enabled", "auto") == "auto":
            config[key] = {**config.get(key, {}), "enabled": precision == key}
    # DeepSpeed's recommended sizes for these, from the model width (as the HF integration does).
    sizes = {
        "reduce_bucket_size": hidden_size * hidden_size,
        "stage3_prefetch_bucket_size": int(0.9 * hidden_size * hidden_size),
        "stage3_param_persistence_threshold": 10 * hidden_size,
    }
    zero.update({k: v for k, v in sizes.items() if zero.get(k) == "auto"})
    return config


def bound_collectives(seconds: float) -> timedelta:
    """Make every wait for a peer, at start and in each collective, end after `seconds`. The
    world's group takes the timeout from accelerate, but DeepSpeed reduces gradients in groups of
    its own (torch's new_group), which take torch's default: 30 minutes on gloo, 10 on NCCL."""
    import torch.distributed.distributed_c10d as c10d

    timeout = timedelta(seconds=seconds)
    c10d.default_pg_timeout = timeout
    if isinstance(c10d.default_pg_nccl_timeout, timedelta):  # None where NCCL is not built
        c10d.default_pg_nccl_timeout = timeout
    return timeout


def build_accelerator(tcfg: TrainConfig, hidden_size: int):
    from accelerate import Accelerator, DeepSpeedPlugin
    from accelerate.utils import InitProcessGroupKwargs

    cpu = not use_cuda(tcfg)
    world = int(os.environ.get("WORLD_SIZE", "1"))  # set by accelerate launch (torchrun)
    plugin = None
    if tcfg.zero_stage > 0:
        plugin = DeepSpeedPlugin(
            hf_ds_config=deepspeed_config(tcfg, world, hidden_size), zero3_save_16bit_model=True
        )
    # On CPU the process group must be gloo, or accelerate and DeepSpeed disagree on the world size;
    # a single process has no group to set.
    timeout = bound_collectives(tcfg.collective_timeout_s)
    kwargs = [InitProcessGroupKwargs(backend="gloo" if cpu else "nccl", timeout=timeout)] if world > 1 else []
    return Accelerator(
        deepspeed_plugin=plugin,
        gradient_accumulation_steps=tcfg.grad_accum,
        mixed_precision=mixed_precision(tcfg),
        cpu=cpu and plugin is None,
        kwargs_handlers=kwargs,
    )


def basic_optimizer_name(optimizer) -> str:
    """The optimizer under accelerate's and DeepSpeed's wrappers (DeepSpeedCPUAdam when offloaded)."""
    while hasattr(optimizer, "optimizer"):
        optimizer = optimizer.optimizer
    return type(optimizer).__name__


def lost_peers(exc: BaseException) -> bool:
    """Whether a failure is a collective that lost its peers: one timed out, or a peer's connection
    went (gloo says so in a RuntimeError; NCCL and the rendezvous store raise DistError)."""
    import torch.distributed as dist

    return isinstance(exc, dist.DistError) or (isinstance(exc, RuntimeError) and "gloo/transport" in str(exc))


def run_rank(main: Callable[[], None], label: str) -> NoReturn:
    """Run an `accelerate launch` entry point's `main` on this rank, then leave without the
    interpreter's shutdown: there, C++ destructors of gloo's and DeepSpeed's still-joinable
    threads can abort a finished rank with SIGABRT ("terminate called without an active
    exception") after its work is saved; seen twice in fresh-clone CI (6 December 2026, rank 1 of a
    ZeRO-3 stage after its checkpoint), once even after destroy_process_group. A rank that lost its
    peers says so and exits 1 at once (the process group's destructors would wait on them)."""
    try:
        main()
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(0)
    except Exception as exc:
        if not lost_peers(exc):
            raise
        print(
            f"{label}: rank {os.environ.get('RANK', '?')} lost contact with the other ranks and stops: "
            f"{str(exc).splitlines()[0]}\nAnother rank died or hangs (its output says why); a rank waits "
            "for its peers at most train.collective_timeout_s seconds.",
            file=sys.stderr,
            flush=True,
        )
        os._exit(1)
