"""Model families: which architectures distill trains, and the checks a model directory passes
before any work starts.

The family of a model is its config.json `model_type`. distill supports one family today,
Qwen2-Audio; a model of another family, or a directory without the files the loop reads (the
config, the processor, the tokenizer's chat template), is refused when the run starts, with the
file, what was found and what is supported, instead of failing inside training or vLLM later.
"""

from __future__ import annotations

import json
from pathlib import Path

from distill.config import ConfigError
from distill.io import read_json

# model_type (config.json) -> the family's name.
SUPPORTED = {"qwen2_audio": "Qwen2-Audio"}
# Where transformers keeps a processor's feature extractor and a tokenizer's chat template.
PROCESSOR_FILES = ("processor_config.json", "preprocessor_config.json")
TEMPLATE_FILES = ("chat_template.jinja", "chat_template.json")


def _read(path: Path, key: str) -> dict:
    try:
        value = read_json(path)
    except FileNotFoundError:
        raise ConfigError(f"{key}: no {path.name} in {path.parent} (not a Hugging Face model directory)") from None
    except (OSError, json.JSONDecodeError) as exc:
        raise ConfigError(f"{key}: cannot read {path} ({exc})") from None
    if not isinstance(value, dict):
        raise ConfigError(f"{key}: {path} is not a JSON object")
    return value


def family_of(model_dir: Path, key: str = "model.path") -> str:
    """The model type of the model at `model_dir` (given by config key `key`), refused unless
    distill supports its family."""
    path = model_dir / "config.json"
    model_type = _read(path, key).get("model_type")
    if model_type not in SUPPORTED:
        supported = ", ".join(f"{t} ({name})" for t, name in SUPPORTED.items())
        raise ConfigError(f"{key}: {path} has model_type {model_type!r}, which distill does not train; supported: "
                          f"{supported}")
    return model_type


def check_model_dir(model_dir: Path, key: str = "model.path") -> str:
    """Refuse a model directory distill cannot run, before any work: an unsupported family, no
    processor (the feature extractor that turns audio into features), no chat template (the
    prompts are rendered with it). Returns the model type."""
    model_type = family_of(model_dir, key)
    if not any((model_dir / name).exists() for name in PROCESSOR_FILES):
        raise ConfigError(f"{key}: {model_dir} has no processor ({' or '.join(PROCESSOR_FILES)}); save the model's "
                          "processor there (AutoProcessor.from_pretrained(...).save_pretrained(DIR))")
    tokenizer_config = model_dir / "tokenizer_config.json"
    has_template = any((model_dir / name).exists() for name in TEMPLATE_FILES) or (
        tokenizer_config.exists() and _read(tokenizer_config, key).get("chat_template"))
    if not has_template:
        raise ConfigError(f"{key}: {model_dir} has no chat template ({', '.join(TEMPLATE_FILES)}, or chat_template in "
                          "tokenizer_config.json); copy the one published with the model")
    return model_type
