import os
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
# DeepSpeed's op build and wandb stay inside the checkout; tests never reach a network.
os.environ.setdefault("TORCH_EXTENSIONS_DIR", str(REPO / ".cache" / "torch_extensions"))
os.environ.setdefault("WANDB_MODE", "offline")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.chdir(REPO)


@pytest.fixture(scope="session")
def tiny_model(tmp_path_factory) -> Path:
    from distill.models.registry import build_tiny_model

    return build_tiny_model(tmp_path_factory.mktemp("models") / "tiny")
