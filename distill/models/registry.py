"""Model families: which architectures distill trains, the registry of their modules, and the
checks a model directory passes before any work starts.

The family of a model is its config.json `model_type`. A model of an unsupported family, or a
directory without the files the loop reads (the config, the processor, the tokenizer's chat
template), is refused when the run starts, with the file, what was found and what is supported,
instead of failing inside training or vLLM later.

Adding a family: one module in this package with a `Family` subclass (family.py), and one line
in FAMILIES below.
"""

from __future__ import annotations

import json
import shutil
import tempfile
from pathlib import Path

from distill.core.files import read_json
from distill.core.schema import ConfigError
from distill.models.audio_flamingo3 import AudioFlamingo3
from distill.models.config import TinyModelConfig
from distill.models.family import Family
from distill.models.qwen2_5_omni import Qwen25Omni
from distill.models.qwen2_audio import Qwen2Audio
from distill.models.qwen3_omni import Qwen3Omni

FAMILIES: tuple[Family, ...] = (Qwen2Audio(), Qwen25Omni(), Qwen3Omni(), AudioFlamingo3())
# model_type (config.json) -> its family.
BY_MODEL_TYPE = {model_type: family for family in FAMILIES for model_type in family.model_types}
# Audio LMs distill knows of but cannot train: no transformers class (remote code only) and no
# upstream vLLM model, so neither the trainer nor the engine can load them in-process.
SERVER_ONLY = {"step_audio_2": "Step-Audio 2 / Step-Audio-R1", "kimi_audio": "Kimi-Audio"}
# Where transformers keeps a processor's feature extractor and a tokenizer's chat template.
PROCESSOR_FILES = ("processor_config.json", "preprocessor_config.json")
TEMPLATE_FILES = ("chat_template.jinja", "chat_template.json")


def _read(path: Path, key: str) -> dict:
    try:
        value = read_json(path)
    except FileNotFoundError:
        raise ConfigError(
            f"{key}: no {path.name} in {path.parent} (not a Hugging Face model directory)"
        ) from None
    except (OSError, json.JSONDecodeError) as exc:
        raise ConfigError(f"{key}: cannot read {path} ({exc})") from None
    if not isinstance(value, dict):
        raise ConfigError(f"{key}: {path} is not a JSON object")
    return value


def supported() -> str:
    """The supported model types and their families, for messages."""
    return ", ".join(f"{t} ({f.title})" for t, f in BY_MODEL_TYPE.items())


def family_named(name: str, key: str = "--family") -> Family:
    """The family called `name` (its `Family.name`)."""
    for family in FAMILIES:
        if family.name == name:
            return family
    raise ConfigError(
        f"{key}={name!r}: no such model family; choose from {', '.join(f.name for f in FAMILIES)}"
    )


def family_of(model_dir: str | Path, key: str = "model.path") -> Family:
    """The family of the model at `model_dir` (given by config key `key`), refused unless distill
    supports it. Its runtime is prepared (import hooks a CPU install needs), so the caller may load it."""
    path = Path(model_dir) / "config.json"
    model_type = _read(path, key).get("model_type")
    if model_type in SERVER_ONLY:
        raise ConfigError(
            f"{key}: {path} is {SERVER_ONLY[model_type]} (model_type {model_type!r}), which has no "
            "transformers class and no upstream vLLM model, so distill can neither train nor serve it "
            "here. Sample from it through its own server (sample.backend=server, as in "
            f"configs/step_audio_r1_server.yaml) and train a student of a supported family: {supported()}"
        )
    if model_type not in BY_MODEL_TYPE:
        raise ConfigError(
            f"{key}: {path} has model_type {model_type!r}, which distill does not train; supported: "
            f"{supported()}"
        )
    family = BY_MODEL_TYPE[model_type]
    family.prepare_runtime()
    return family


def check_model_dir(model_dir: Path, key: str = "model.path") -> Family:
    """Refuse a model directory distill cannot run, before any work: an unsupported family, no
    processor (the feature extractor that turns audio into features), no chat template (the
    prompts are rendered with it). Returns the family."""
    family = family_of(model_dir, key)
    if not any((model_dir / name).exists() for name in PROCESSOR_FILES):
        raise ConfigError(
            f"{key}: {model_dir} has no processor ({' or '.join(PROCESSOR_FILES)}); save the model's "
            "processor there (AutoProcessor.from_pretrained(...).save_pretrained(DIR))"
        )
    tokenizer_config = model_dir / "tokenizer_config.json"
    has_template = any((model_dir / name).exists() for name in TEMPLATE_FILES) or (
        tokenizer_config.exists() and _read(tokenizer_config, key).get("chat_template")
    )
    if not has_template:
        raise ConfigError(
            f"{key}: {model_dir} has no chat template ({', '.join(TEMPLATE_FILES)}, or chat_template in "
            "tokenizer_config.json); copy the one published with the model"
        )
    return family


def build_tiny_model(out_dir: str | Path, cfg: TinyModelConfig | None = None) -> Path:
    """Write a tiny random model of family cfg.family (a TinyModelConfig, distill/models/config.py; default
    Qwen2-Audio) to `out_dir`: the real classes, special tokens and chat template, only small.

    The folder is written under a temp name and renamed, so a crash never leaves half a model.
    """
    cfg = cfg or TinyModelConfig()
    family = family_named(cfg.family, "model.tiny.family")
    family.prepare_runtime()
    out_dir = Path(out_dir)
    if out_dir.exists() and any(out_dir.iterdir()):
        raise FileExistsError(f"{out_dir}: not empty; a tiny model is only built into a new or empty folder")
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=out_dir.parent, prefix=f".{out_dir.name}."))
    try:
        family.build_tiny(tmp, cfg)
        if out_dir.exists():
            out_dir.rmdir()  # empty, checked above
        tmp.rename(out_dir)
    except OSError:
        shutil.rmtree(tmp, ignore_errors=True)
        if not (out_dir / "config.json").exists():
            raise
        # Another process (a parallel array task) finished the same build first: use its model.
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out_dir
