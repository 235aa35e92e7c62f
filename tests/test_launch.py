"""Launching training: what the launcher clears before the ranks start."""

import os
import time

from distill.training.launch import clear_stale_build_locks


def test_a_build_lock_left_by_a_killed_build_is_removed_and_a_live_one_kept(tmp_path, capsys):
    stale, live = tmp_path / "deepspeed_shm_comm" / "lock", tmp_path / "cpu_adam" / "lock"
    for lock in (stale, live):
        lock.parent.mkdir()
        lock.touch()
    hour_ago = time.time() - 3600
    os.utime(stale, (hour_ago, hour_ago))
    assert clear_stale_build_locks(tmp_path, max_age_s=600) == [stale]
    assert not stale.exists() and live.exists()
    assert "left by a build that was killed" in capsys.readouterr().out
