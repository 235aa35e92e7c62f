"""The processes distill starts end when distill ends, however it ends (SIGKILL included).

A watcher process, started in a session of its own so that a kill of distill's process group
misses it, waits for its owner to end (the pipe from it closes, or the watcher's parent changes)
and then SIGKILLs what the owner started and left running, until none is left. A clean exit ends
the owner too: what is still running then is ended the same way (normally nothing; wandb's
service ends itself as the owner exits, so it is not ended before). It knows
them two ways:
- by an owner token in the environment (DISTILL_OWNER), which every program the owner executes
  inherits, whatever session or process group it makes: accelerate's launcher, the training ranks
  (torchrun starts them in sessions of their own), DeepSpeed's compiler, wandb's service;
- by PID, for what the owner adopts: vLLM's engine processes rename themselves (setproctitle
  writes over their environment block, so the token cannot be read there), and the engine
  adopts them once they run (rollout/engine.py). A process forked from the owner without
  executing a program shows the owner's environment as it started, without the token: whatever
  starts one must adopt it the same way.

Why a watcher and not the parent-death signal (prctl PR_SET_PDEATHSIG): that signal reaches only
a direct child that sets it, is cleared in every forked grandchild and is Linux-only, and distill
does not run the code of most of its descendants. Why not a process group that distill tears
down: a SIGKILLed process tears nothing down.
"""

from __future__ import annotations

import os
import secrets
import select
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager

OWNER_ENV = "DISTILL_OWNER"
# How often the watcher checks its parent while the pipe stays open (a forked child of the owner,
# such as vLLM's engine on CPU, holds its write end after the owner is gone).
POLL_SECONDS = 0.2
# How long the watcher keeps ending processes that are still starting (a launcher mid-spawn).
SWEEP_SECONDS = 30.0
SETTLE_SECONDS = 0.5

# The watcher of the current owning_processes() block; every watcher started is kept, so that its
# pipe stays open until this process exits.
_watcher: subprocess.Popen | None = None
_watchers: list[subprocess.Popen] = []


def started_at(proc, created: float) -> bool:
    """Whether psutil process `proc` is the one that started at `created` (not a reused PID)."""
    return abs(proc.create_time() - created) < 0.01


def owned_by(token: str, adopted: dict[int, float] | None = None, exclude: int | None = None) -> list:
    """The live processes (psutil) whose environment carries owner `token`, the `adopted` ones
    (PID: start time) still running, and the descendants of both."""
    import psutil

    found: dict[int, psutil.Process] = {}
    for proc in psutil.process_iter():
        try:
            start = (adopted or {}).get(proc.pid)
            if (start is not None and started_at(proc, start)) or proc.environ().get(OWNER_ENV) == token:
                for p in [proc, *proc.children(recursive=True)]:
                    found[p.pid] = p
        except (psutil.Error, OSError):  # gone, another user's, or a kernel thread
            continue
    alive = []
    for pid, proc in found.items():
        try:
            if pid not in (exclude, os.getpid()) and proc.status() != psutil.STATUS_ZOMBIE:
                alive.append(proc)
        except psutil.Error:
            continue
    return alive


def end_owned(token: str, adopted: dict[int, float] | None = None, exclude: int | None = None) -> list[str]:
    """SIGKILL what owned_by finds, sweeping again until nothing is left twice in a row (a dying
    launcher may still be starting a rank); the PIDs and names of what was ended."""
    import psutil

    ended: list[str] = []
    deadline = time.monotonic() + SWEEP_SECONDS
    settled = False
    while time.monotonic() < deadline:
        procs = owned_by(token, adopted, exclude)
        if not procs:
            if settled:
                break
            # A child forked but not yet executed shows its parent's environment, not the token
            # it is about to carry: look once more after it has had time to execute.
            settled = True
            time.sleep(SETTLE_SECONDS)
            continue
        settled = False
        for proc in procs:
            try:
                ended.append(f"{proc.pid} ({proc.name()})")
                proc.kill()
            except psutil.Error:
                continue
        psutil.wait_procs(procs, timeout=2)
    return ended


@contextmanager
def owning_processes() -> Iterator[str]:
    """Every process this one starts within the block ends once this process ends, cleanly or
    not; yields the owner token."""
    global _watcher
    token = f"{os.getpid()}-{secrets.token_hex(6)}"
    env = {k: v for k, v in os.environ.items() if k != OWNER_ENV}
    _watcher = subprocess.Popen(
        [sys.executable, "-m", "distill.core.processes", str(os.getpid()), token],
        stdin=subprocess.PIPE,
        env=env,
        start_new_session=True,
    )
    _watchers.append(_watcher)
    before = os.environ.get(OWNER_ENV)
    os.environ[OWNER_ENV] = token
    try:
        yield token
    finally:
        _watcher = None
        if before is None:
            os.environ.pop(OWNER_ENV, None)
        else:
            os.environ[OWNER_ENV] = before


def adopt_children() -> None:
    """Hand this process's descendants to the watcher by PID (those the token cannot mark); a
    no-op outside owning_processes()."""
    import psutil

    if _watcher is None:
        return
    lines = []
    for child in psutil.Process().children(recursive=True):
        try:
            if child.pid != _watcher.pid:
                lines.append(f"{child.pid} {child.create_time()}\n")
        except psutil.Error:
            continue
    _watcher.stdin.write("".join(lines).encode())
    _watcher.stdin.flush()


def watch(owner: int, token: str) -> int:
    """The watcher: take adopted PIDs until `owner` ends, then end what it started."""
    adopted: dict[int, float] = {}
    pending = b""
    while os.getppid() == owner:
        if not select.select([sys.stdin], [], [], POLL_SECONDS)[0]:
            continue
        data = os.read(sys.stdin.fileno(), 65536)
        if not data:
            break  # end of file: the owner has exited, and no forked child of it holds the pipe
        *lines, pending = (pending + data).split(b"\n")
        adopted.update((int(pid), float(start)) for pid, start in (line.split() for line in lines))
    ended = end_owned(token, adopted, exclude=owner)
    if ended:
        try:
            print(
                f"distill: process {owner} has ended; ended {len(ended)} process(es) it had started: "
                f"{', '.join(ended)}",
                file=sys.stderr,
                flush=True,
            )
        except OSError:  # the owner's terminal or log may be gone with it
            pass
    return 0


if __name__ == "__main__":
    sys.exit(watch(int(sys.argv[1]), sys.argv[2]))
