"""Training state on disk: the last saved step under OUT/checkpoints (model, optimizer, scheduler,
RNG of every rank, then progress.json), and the step log a resumed run keeps."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

from distill.core.files import atomic_write_json, read_json


def last_checkpoint(out: Path) -> Path | None:
    """The newest complete training state under OUT/checkpoints (progress.json is written last)."""
    done = sorted((out / "checkpoints").glob("step-*/progress.json"))
    return done[-1].parent if done else None


def save_checkpoint(accelerator, out: Path, progress: dict) -> None:
    """Save the full training state (model, optimizer, scheduler, RNG of every rank), then keep
    only this one: the state of one step is all a resume needs."""
    path = out / "checkpoints" / f"step-{progress['step']:08d}"
    accelerator.save_state(str(path))
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        atomic_write_json(path / "progress.json", progress)
        for old in (out / "checkpoints").glob("step-*"):
            if old != path:
                shutil.rmtree(old, ignore_errors=True)
    accelerator.wait_for_everyone()


def read_log(path: Path, upto: int) -> list[str]:
    """The training log's lines up to step `upto` (what a resumed state includes); a line cut short
    by a kill is dropped."""
    lines = []
    for line in path.read_text().splitlines() if path.exists() else []:
        try:
            if json.loads(line)["step"] <= upto:
                lines.append(line)
        except (json.JSONDecodeError, KeyError, TypeError):
            continue
    return lines


def resume(accelerator, out: Path, plan: dict) -> int:
    """Load the last saved state under OUT/checkpoints, if any, and return its step (0: none). A
    state saved under another plan is refused: resuming it would train other batches."""
    path = last_checkpoint(out)
    if path is None:
        return 0
    saved = read_json(path / "progress.json")
    changed = [k for k in plan if saved.get(k) != plan[k]]
    if changed:
        raise RuntimeError(
            f"{path}: saved under another training plan ({', '.join(changed)} changed); "
            f"restore those settings, or delete {out / 'checkpoints'} to start over"
        )
    accelerator.load_state(str(path))
    if accelerator.is_main_process:
        print(f"train: resuming from {path} (step {saved['step']} of {plan['total_steps']})")
    return saved["step"]
