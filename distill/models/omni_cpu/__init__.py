"""The Qwen-Omni families on a CPU install: import hooks in place of torchvision.

Both Qwen-Omni families need torchvision to load at all (their processors and vLLM's model code
import it), and no CPU build of torchvision matches the CPU torch distill installs. `enable()`
installs hooks (sitecustomize.py beside this file) in this process and, through PYTHONPATH, in
every process it starts. With torchvision installed (any GPU install) it does nothing.
"""

from __future__ import annotations

import importlib.util
import os
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent


def needed() -> bool:
    """Whether this install lacks torchvision (a CPU install)."""
    return importlib.util.find_spec("torchvision") is None


def enable() -> None:
    """Install the hooks here and in every process started from here on, where torchvision is missing."""
    if not needed():
        return
    path = os.environ.get("PYTHONPATH", "")
    if str(HERE) not in path.split(os.pathsep):
        os.environ["PYTHONPATH"] = os.pathsep.join(p for p in (str(HERE), path) if p)
    spec = importlib.util.spec_from_file_location("distill_omni_cpu_hooks", HERE / "sitecustomize.py")
    module = sys.modules.get(spec.name)
    if module is None:
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
        sys.modules[spec.name] = module
    module.install()
