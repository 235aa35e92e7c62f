"""One writer per unit of work in a run directory.

A unit is what one process writes: the whole run (`distill run`), one stage of one round, or one
part of a stage that several jobs share (a shard of sampling or grounding, a node of multi-node
training). Each unit has a lock file under RUN/locks/, held with flock(2): the kernel releases it
when its holder ends, however it ends, so a lock is never left held by a dead process and no PID
needs guessing at. The holder writes who it is into the file (PID, host, command, owner token);
a process refused the lock is told that, and a process that finds the record of a holder that
ended without releasing takes the lock over, says so, and ends what that holder left running on
this host (distill.core.processes).

Units nest: the run, then a stage, then its parts. A whole takes its lock exclusively; a part
takes its whole's lock shared and its own exclusively. So `distill run` excludes every other
writer, Slurm array tasks on different shards of one round run side by side, and two tasks on one
shard, or a whole-stage run beside a shard task, are refused.

On a filesystem without flock (some Lustre mounts) the locks are off, with one warning.
"""

from __future__ import annotations

import errno
import fcntl
import json
import os
import socket
import sys
import time
from collections.abc import Iterator
from contextlib import ExitStack, contextmanager
from pathlib import Path

from distill.core.processes import OWNER_ENV, end_owned, started_at

# The unit `distill run` holds exclusively and every other writer of the run shared.
RUN_UNIT = "run"
UNSUPPORTED = (errno.ENOLCK, errno.EOPNOTSUPP, errno.ENOSYS, errno.EINVAL)
_warned = False


class LockHeld(RuntimeError):
    """Another live process holds a unit of work this process was to write."""


def locks_dir(run_dir: Path) -> Path:
    return run_dir / "locks"


def read_record(path: Path) -> dict | None:
    """The holder a lock file names (None: released, or a record being written)."""
    try:
        text = path.read_text()
    except OSError:
        return None
    try:
        record = json.loads(text) if text.strip() else None
    except json.JSONDecodeError:
        return None
    return record if isinstance(record, dict) else None


def record_alive(record: dict) -> bool:
    """Whether the process a record names may still run: on this host, checked (PID and start
    time, so a reused PID does not count); on another host, assumed."""
    if record.get("host") != socket.gethostname():
        return True
    import psutil

    try:
        return started_at(psutil.Process(record["pid"]), record["created"])
    except (psutil.Error, KeyError, TypeError):
        return False


def describe(record: dict) -> str:
    since = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(record.get("since", 0)))
    return f"PID {record.get('pid')} on {record.get('host')} (`{record.get('command', '?')}`, since {since})"


def live_holders(directory: Path, prefix: str) -> list[tuple[str, dict]]:
    """(unit, record) of every live holder of a lock under `directory` whose unit starts with `prefix`."""
    found = []
    for path in sorted(directory.glob(f"{prefix}*.lock")):
        record = read_record(path)
        if record is not None and record_alive(record):
            found.append((path.stem, record))
    return found


def _own_record(unit: str) -> dict:
    import psutil

    return {
        "unit": unit,
        "pid": os.getpid(),
        "host": socket.gethostname(),
        "created": psutil.Process().create_time(),
        "since": time.time(),
        "command": " ".join(["distill", *sys.argv[1:]])[:300],
        "token": os.environ.get(OWNER_ENV, ""),
    }


def _take_over(unit: str, record: dict) -> None:
    print(f"lock: {unit}: taking over from {describe(record)}, which ended without releasing it", flush=True)
    if record.get("host") == socket.gethostname() and record.get("token"):
        ended = end_owned(record["token"])
        if ended:
            print(
                f"lock: {unit}: ended {len(ended)} process(es) it had left running: {', '.join(ended)}",
                flush=True,
            )


def _refusal(path: Path, unit: str, exclusive: bool) -> LockHeld:
    record = read_record(path)
    if record is not None and record_alive(record):
        who = describe(record)
    else:  # held shared by the parts' writers: name them
        parts = [
            f"{u} by {describe(r)}"
            for u, r in live_holders(path.parent, "" if unit == RUN_UNIT else unit + ".")
            if u != unit
        ]
        who = "; ".join(parts) if parts else "another distill process"
    what = "exclusively" if exclusive else "shared"
    return LockHeld(
        f"{path}: {unit} is being written by {who}; this process needed it {what}. Wait for that "
        "process to finish, or end it and re-run (a killed holder's lock is taken over)"
    )


@contextmanager
def unit_lock(run_dir: Path, unit: str, exclusive: bool = True) -> Iterator[None]:
    """Hold `unit`'s lock for the block (exclusive: this process writes all of it; shared: it
    writes a part, whose own lock it holds exclusively); refused at once with LockHeld."""
    global _warned
    path = locks_dir(run_dir) / f"{unit}.lock"
    path.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        try:
            fcntl.flock(fd, (fcntl.LOCK_EX if exclusive else fcntl.LOCK_SH) | fcntl.LOCK_NB)
        except BlockingIOError:
            raise _refusal(path, unit, exclusive) from None
        except OSError as exc:
            if exc.errno not in UNSUPPORTED:
                raise
            if not _warned:
                print(
                    f"lock: {path.parent}: this filesystem has no flock ({exc.strerror}); distill cannot "
                    "refuse a second writer of a run here",
                    file=sys.stderr,
                    flush=True,
                )
                _warned = True
            yield
            return
        if exclusive:
            record = read_record(path)
            if record is not None:
                _take_over(unit, record)
            os.ftruncate(fd, 0)
            os.pwrite(fd, json.dumps(_own_record(unit)).encode(), 0)
        try:
            yield
        finally:
            if exclusive:
                os.ftruncate(fd, 0)  # released: the next holder has nothing to take over
    finally:
        os.close(fd)  # closing the descriptor releases the lock


@contextmanager
def unit_locks(run_dir: Path, whole: str, part: str | None = None) -> Iterator[None]:
    """`whole` exclusively, or, with `part`, `whole` shared and `whole.part` exclusively."""
    with ExitStack() as stack:
        stack.enter_context(unit_lock(run_dir, whole, exclusive=part is None))
        if part is not None:
            stack.enter_context(unit_lock(run_dir, f"{whole}.{part}"))
        yield
