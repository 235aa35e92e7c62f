"""Processes distill starts end when distill ends, however it ends (distill/processes.py)."""

import os
import signal
import subprocess
import sys
import textwrap
import time

import psutil
import pytest

from distill.core.processes import OWNER_ENV, owned_by

# A child in a session of its own (as torchrun starts training ranks), which starts a grandchild
# in yet another session; each prints its PID.
DESCENDANTS = textwrap.dedent(
    """
    import subprocess, sys, time
    sleeper = [sys.executable, "-c", "import time; time.sleep(600)"]
    child = subprocess.Popen([sys.executable, "-c", f"import subprocess, time; "
                              f"p = subprocess.Popen({sleeper!r}, start_new_session=True); """
    """print(p.pid, flush=True); "
                              f"time.sleep(600)"], start_new_session=True, stdout=subprocess.PIPE, text=True)
    grandchild = int(child.stdout.readline())
    print(child.pid, grandchild, flush=True)
"""
)


def start_owner(body: str) -> tuple[subprocess.Popen, list[int]]:
    """A Python process that starts DESCENDANTS inside owning_processes(), then runs `body`."""
    code = (
        "from distill.core.processes import owning_processes\nwith owning_processes():\n"
        + textwrap.indent(DESCENDANTS + body, "    ")
    )
    owner = subprocess.Popen(
        [sys.executable, "-c", code], stdout=subprocess.PIPE, text=True, start_new_session=True
    )
    return owner, [int(x) for x in owner.stdout.readline().split()]


def token_of(pid: int) -> str:
    """The owner token in a process's environment, once it has executed (a child forked but not
    yet executed shows its parent's environment)."""
    deadline = time.monotonic() + 10
    while OWNER_ENV not in (env := psutil.Process(pid).environ()) and time.monotonic() < deadline:
        time.sleep(0.02)
    return env[OWNER_ENV]


def gone_within(pids: list[int], seconds: float) -> float | None:
    """Seconds until every process of `pids` has ended (None: not within `seconds`)."""
    start = time.monotonic()
    while time.monotonic() - start < seconds:
        alive = [
            p for p in pids if psutil.pid_exists(p) and psutil.Process(p).status() != psutil.STATUS_ZOMBIE
        ]
        if not alive:
            return time.monotonic() - start
        time.sleep(0.02)
    return None


@pytest.mark.parametrize("kill", ["owner", "group"])
def test_a_sigkilled_owner_takes_the_processes_it_started_with_it(kill):
    owner, descendants = start_owner("time.sleep(600)\n")
    try:
        assert len(descendants) == 2 and all(psutil.pid_exists(p) for p in descendants)
        token = token_of(descendants[1])
        assert token.startswith(f"{owner.pid}-")
        if kill == "group":  # what a terminal's kill of the job does: the sessions of their own are missed
            os.killpg(owner.pid, signal.SIGKILL)
        else:
            owner.kill()
        owner.wait()
        assert gone_within(descendants, 10) is not None
        assert not owned_by(token)
    finally:
        for pid in descendants:
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass


def test_a_clean_exit_leaves_nothing_behind():
    owner, descendants = start_owner("")
    assert owner.wait(timeout=30) == 0
    assert gone_within(descendants, 10) is not None


def test_the_block_restores_the_environment():
    from distill.core.processes import owning_processes

    with owning_processes() as token:
        assert os.environ[OWNER_ENV] == token
    assert OWNER_ENV not in os.environ


@pytest.mark.e2e
def test_a_sigkilled_owner_takes_a_separate_vllm_engine_with_it(tiny_model, tmp_path):
    """vLLM's engine process (engine.process=separate, the default on GPU) outlives a SIGKILLed
    parent on its own (measured: still there 37 s later); owned, it ends with it."""
    code = textwrap.dedent(f"""
        import time
        from distill.config import load_config
        from distill.core.processes import owning_processes
        from distill.rollout.engine import EngineCache
        if __name__ == "__main__":
            cfg = load_config("configs/demo_cpu.yaml", ["output_dir={tmp_path}", "engine.process=separate"])
            with owning_processes(), EngineCache(cfg.engine, 0) as engines:
                engines.get("{tiny_model}")
                print("ready", flush=True)
                time.sleep(600)
    """)
    script = tmp_path / "engine.py"
    script.write_text(code)
    owner = subprocess.Popen([sys.executable, str(script)], stdout=subprocess.PIPE, text=True)
    try:
        for line in owner.stdout:  # vLLM logs here too
            if line.strip() == "ready":
                break
        engine = psutil.Process(owner.pid).children(recursive=True)
        assert any("EngineCore" in " ".join(p.cmdline()) or "EngineCore" in p.name() for p in engine), engine
        owner.kill()
        owner.wait()
        assert gone_within([p.pid for p in engine], 10) is not None
    finally:
        owner.kill()
