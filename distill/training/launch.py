"""Launching the SFT entry point: `accelerate launch ... distill/train.py ...` as a subprocess."""

from __future__ import annotations

import os
import shlex
import socket
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

from distill.training.config import TrainConfig

TRAIN_SCRIPT = Path(__file__).parent.parent / "train.py"
# A torch extension build lock older than this was left by a killed build: DeepSpeed's ops build
# in under a minute here, so ten minutes leaves room for a slow machine.
STALE_BUILD_S = 600.0


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def use_cuda(tcfg: TrainConfig) -> bool:
    import torch

    return tcfg.device == "cuda" or (tcfg.device == "auto" and torch.cuda.is_available())


def mixed_precision(tcfg: TrainConfig) -> str:
    """train.mixed_precision with "auto" resolved: bf16 on GPU, full precision on CPU."""
    if tcfg.mixed_precision != "auto":
        return tcfg.mixed_precision
    return "bf16" if use_cuda(tcfg) else "no"


@dataclass(frozen=True)
class Machines:
    """The nodes a training stage runs on: how many, this node's rank, the main process's address."""

    count: int = 1
    rank: int = 0
    main_ip: str = ""
    main_port: int = 0


def machines_from_env(env: dict[str, str] | None = None) -> Machines:
    """One machine, or the nodes of a Slurm training job: SLURM_NNODES and this node's SLURM_NODEID,
    with the main process's address the job script exported (launch/templates/train.sbatch)."""
    env = os.environ if env is None else env
    if "DISTILL_MAIN_PROCESS_IP" not in env or int(env.get("SLURM_NNODES", "1")) <= 1:
        return Machines()
    return Machines(
        int(env["SLURM_NNODES"]),
        int(env["SLURM_NODEID"]),
        env["DISTILL_MAIN_PROCESS_IP"],
        int(env["DISTILL_MAIN_PROCESS_PORT"]),
    )


def accelerate_command(
    tcfg: TrainConfig, section: str, script: Path, args: list[str], machines: Machines = Machines()
) -> list[str]:
    """`accelerate launch` of `script` with `args` under a TrainConfig's processes, precision and
    ZeRO stage; on several machines, this node's part (num_processes counts those of all nodes)."""
    if tcfg.num_processes % machines.count:
        raise ValueError(
            f"{section}.num_processes={tcfg.num_processes} does not split evenly over {machines.count} nodes"
        )
    cmd = [
        sys.executable,
        "-m",
        "accelerate.commands.launch",
        "--num_processes",
        str(tcfg.num_processes),
        "--num_machines",
        str(machines.count),
        "--mixed_precision",
        mixed_precision(tcfg),
    ]
    if machines.count > 1:
        cmd += [
            "--machine_rank",
            str(machines.rank),
            "--main_process_ip",
            machines.main_ip,
            "--main_process_port",
            str(machines.main_port),
        ]
    else:
        cmd += ["--main_process_port", str(free_port())]
    if tcfg.zero_stage > 0:
        cmd += ["--use_deepspeed", "--zero_stage", str(tcfg.zero_stage)]
        if machines.count > 1:  # each node's accelerate starts its own ranks (no pdsh/ssh)
            cmd += ["--deepspeed_multinode_launcher", "standard"]
    return cmd + [str(script), *args]


def train_command(
    tcfg: TrainConfig,
    config_path: Path,
    data: list[Path],
    model: Path,
    out: Path,
    section: str,
    machines: Machines = Machines(),
) -> list[str]:
    """The accelerate command line for one training stage (what a user would type); on several
    machines, this node's part of it (train.num_processes counts the processes of all nodes)."""
    args = ["--config", str(config_path), "--data", *map(str, data), "--model", str(model), "--out", str(out)]
    return accelerate_command(tcfg, section, TRAIN_SCRIPT, [*args, "--section", section], machines)


def train_env(tcfg: TrainConfig) -> dict[str, str]:
    env = dict(os.environ)
    # DeepSpeed compiles a small op with g++ on first use (~25 s); cache it where all runs reuse it.
    env.setdefault("TORCH_EXTENSIONS_DIR", str(Path.home() / ".cache" / "distill" / "torch_extensions"))
    env.setdefault("OMP_NUM_THREADS", str(max(1, (os.cpu_count() or 1) // tcfg.num_processes)))
    env.setdefault("TOKENIZERS_PARALLELISM", "false")
    if tcfg.device == "cpu":
        env["CUDA_VISIBLE_DEVICES"] = ""  # DeepSpeed would otherwise pick the GPU up
    return env


def clear_stale_build_locks(extensions_dir: Path, max_age_s: float = STALE_BUILD_S) -> list[Path]:
    """Remove the build locks of torch's extension builder (DeepSpeed's ops) older than
    `max_age_s`. torch marks a build with an empty `lock` file and removes it when done; a process
    killed mid-build leaves it, and every later rank then waits for it forever, silently."""
    removed = []
    for lock in sorted(extensions_dir.glob("*/lock")):
        try:
            if time.time() - lock.stat().st_mtime > max_age_s:
                lock.unlink()
                removed.append(lock)
        except FileNotFoundError:
            continue  # its build finished meanwhile
    for lock in removed:
        print(
            f"train: removed {lock}, left by a build that was killed (a build takes under a minute); "
            "the op is built again",
            flush=True,
        )
    return removed


def launch(cmd: list[str], tcfg: TrainConfig, label: str) -> None:
    """Run an accelerate command with the training environment; raise if it fails."""
    env = train_env(tcfg)
    clear_stale_build_locks(Path(env["TORCH_EXTENSIONS_DIR"]))
    print(f"{label}: " + shlex.join(["accelerate", "launch", *cmd[3:]]), flush=True)
    result = subprocess.run(cmd, env=env)
    if result.returncode != 0:
        raise RuntimeError(f"{label} failed (exit {result.returncode}); command: {' '.join(cmd)}")
