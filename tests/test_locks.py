"""One writer per unit of work (distill/locks.py), with real processes and real flock."""

import errno
import fcntl
import json
import os
import socket
import subprocess
import sys
import textwrap
import time

import psutil
import pytest

from distill.core import locks
from distill.core.locks import RUN_UNIT, LockHeld, read_record, unit_lock, unit_locks
from tests.test_processes import token_of


def hold(
    run_dir, unit: str, exclusive: bool = True, child: bool = False
) -> tuple[subprocess.Popen, int | None]:
    """Another process holding `unit` (owning a sleeping child with `child`); returns it and the
    child's PID."""
    code = textwrap.dedent(f"""
        import subprocess, sys, time
        from pathlib import Path
        from distill.core.locks import unit_lock
        from distill.core.processes import owning_processes
        with owning_processes(), unit_lock(Path({str(run_dir)!r}), {unit!r}, {exclusive}):
            pid = ""
            if {child}:
                pid = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(600)"],
                                       start_new_session=True).pid
            print("held", pid, flush=True)
            time.sleep(600)
    """)
    proc = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, text=True)
    words = proc.stdout.readline().split()
    assert words[0] == "held"
    return proc, int(words[1]) if len(words) > 1 else None


def test_a_second_writer_is_refused_with_the_holders_pid_and_host_then_takes_over_a_killed_one(
    tmp_path, capsys
):
    holder, child = hold(tmp_path, RUN_UNIT, child=True)
    try:
        start = time.monotonic()
        with pytest.raises(LockHeld) as refused, unit_lock(tmp_path, RUN_UNIT):
            pass
        assert time.monotonic() - start < 1  # at once, not after a wait
        text = str(refused.value)
        assert (
            f"PID {holder.pid} on {socket.gethostname()}" in text
            and str(tmp_path / "locks" / "run.lock") in text
        )
        # A shared holder (a stage job) is refused by an exclusive one as well.
        with pytest.raises(LockHeld), unit_lock(tmp_path, RUN_UNIT, exclusive=False):
            pass
        record = read_record(tmp_path / "locks" / "run.lock")
        assert record["pid"] == holder.pid and record["token"].startswith(f"{holder.pid}-")
        assert token_of(child) == record["token"]

        # Killed with its watcher (as `pkill -9 -f distill` would), the holder leaves its record
        # and a process it started; the next writer takes over and ends that process.
        for p in psutil.Process(holder.pid).children():
            if "distill.core.processes" in " ".join(p.cmdline()):
                p.kill()
        holder.kill()
        holder.wait()
        capsys.readouterr()
        with unit_lock(tmp_path, RUN_UNIT):
            out = capsys.readouterr().out
            assert f"taking over from PID {holder.pid} on {socket.gethostname()}" in out
            assert f"ended 1 process(es) it had left running: {child} (python" in out
            assert not psutil.pid_exists(child) or psutil.Process(child).status() == psutil.STATUS_ZOMBIE
            assert read_record(tmp_path / "locks" / "run.lock")["pid"] == os.getpid()
        # Released cleanly: nothing to take over next time.
        assert read_record(tmp_path / "locks" / "run.lock") is None
        with unit_lock(tmp_path, RUN_UNIT):
            assert "taking over" not in capsys.readouterr().out
    finally:
        holder.kill()
        if psutil.pid_exists(child):
            psutil.Process(child).kill()


def test_parts_of_a_stage_run_side_by_side_and_the_whole_excludes_them(tmp_path):
    """Slurm array tasks on different shards of one round hold the stage shared and their shard
    exclusively; a second task on one shard, or a whole-stage writer, is refused."""
    stage = "round_001.sample"
    holder, _ = hold(tmp_path, f"{stage}.shard-00000-of-00002")
    shared, _ = hold(tmp_path, stage, exclusive=False)
    try:
        with unit_locks(tmp_path, stage, "shard-00001-of-00002"):
            pass
        with (
            pytest.raises(LockHeld, match=f"PID {holder.pid} on "),
            unit_locks(tmp_path, stage, "shard-00000-of-00002"),
        ):
            pass
        # The whole stage's writer is refused, and told who writes the parts.
        with pytest.raises(LockHeld) as refused, unit_locks(tmp_path, stage):
            pass
        assert f"{stage}.shard-00000-of-00002 by PID {holder.pid}" in str(refused.value)
    finally:
        holder.kill()
        shared.kill()


def test_a_process_refused_a_part_keeps_nothing_locked(tmp_path):
    stage = "round_001.ground"
    holder, _ = hold(tmp_path, f"{stage}.shard-00001-of-00002")
    try:
        with pytest.raises(LockHeld), unit_locks(tmp_path, stage, "shard-00001-of-00002"):
            pass
    finally:
        holder.kill()
        holder.wait()
    with unit_locks(tmp_path, stage):  # the stage lock taken shared above was let go
        pass


def test_a_filesystem_without_flock_warns_once_and_goes_on(tmp_path, monkeypatch, capsys):
    """Some Lustre mounts have no flock; a stand-in for one (none can be mounted here)."""

    def no_flock(fd, op):
        raise OSError(errno.ENOLCK, "No locks available")

    monkeypatch.setattr(fcntl, "flock", no_flock)
    monkeypatch.setattr(locks, "_warned", False)
    with unit_lock(tmp_path, RUN_UNIT), unit_lock(tmp_path, "round_000.train"):
        pass
    err = capsys.readouterr().err
    assert err.count("this filesystem has no flock") == 1


def test_the_record_names_the_command_and_is_json(tmp_path):
    with unit_lock(tmp_path, "round_002.export"):
        record = json.loads((tmp_path / "locks" / "round_002.export.lock").read_text())
        assert record["unit"] == "round_002.export" and record["command"].startswith("distill")
        assert record["host"] == socket.gethostname() and record["created"] == psutil.Process().create_time()
