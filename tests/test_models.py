"""The model-family checks a model directory passes before any work (distill/models)."""

import json
import re
import shutil

import pytest

from distill.config import load_config
from distill.core.rundir import RunDir
from distill.core.schema import ConfigError
from distill.loop import init_run_dir
from distill.models.registry import FAMILIES, check_model_dir, family_named, family_of, supported


def copy_of(tiny_model, tmp_path, **config_changes):
    """The tiny model's files (weights left out: no check reads them), config.json changed."""
    out = tmp_path / "model"
    shutil.copytree(tiny_model, out, ignore=shutil.ignore_patterns("*.safetensors"))
    config = json.loads((out / "config.json").read_text())
    (out / "config.json").write_text(json.dumps({**config, **config_changes}))
    return out


def test_the_tiny_model_passes(tiny_model):
    assert family_of(tiny_model) is check_model_dir(tiny_model) is family_named("qwen2_audio")


def test_an_unsupported_family_is_named_with_the_supported_ones(tiny_model, tmp_path):
    model = copy_of(tiny_model, tmp_path, model_type="whisper")
    with pytest.raises(ConfigError) as refused:
        check_model_dir(model)
    assert str(refused.value) == (
        f"model.path: {model / 'config.json'} has model_type 'whisper', which distill "
        f"does not train; supported: {supported()}"
    )
    assert "qwen2_audio (Qwen2-Audio)" in supported()


def test_a_server_only_model_is_refused_with_the_way_to_use_it(tiny_model, tmp_path):
    model = copy_of(tiny_model, tmp_path, model_type="step_audio_2")
    with pytest.raises(
        ConfigError,
        match="Step-Audio 2 .* no transformers class and no upstream vLLM .*sample.backend=server",
    ):
        check_model_dir(model)


@pytest.mark.parametrize(
    ("remove", "message"),
    [
        (["config.json"], "no config.json in"),
        (["processor_config.json"], "has no processor"),
        (["chat_template.jinja"], "has no chat template"),
    ],
)
def test_a_model_directory_without_what_the_loop_reads_is_refused(tiny_model, tmp_path, remove, message):
    model = copy_of(tiny_model, tmp_path)
    tokenizer_config = json.loads((model / "tokenizer_config.json").read_text())
    assert "chat_template" not in tokenizer_config  # the template lives in its own file only
    for name in remove:
        (model / name).unlink()
    with pytest.raises(ConfigError, match=f"model.path: .*{message}"):
        check_model_dir(model)


def test_a_chat_template_in_the_tokenizer_config_counts(tiny_model, tmp_path):
    model = copy_of(tiny_model, tmp_path)
    template = (model / "chat_template.jinja").read_text()
    (model / "chat_template.jinja").unlink()
    tokenizer_config = json.loads((model / "tokenizer_config.json").read_text())
    (model / "tokenizer_config.json").write_text(json.dumps({**tokenizer_config, "chat_template": template}))
    assert check_model_dir(model).name == "qwen2_audio"


def test_the_run_refuses_the_model_before_any_work(tiny_model, tmp_path):
    model = copy_of(tiny_model, tmp_path, model_type="gemma3n")
    cfg = load_config(
        "configs/demo_cpu.yaml", [f"output_dir={tmp_path}", f"model.path={model}", "model.build_tiny=false"]
    )
    with pytest.raises(ConfigError, match="model_type 'gemma3n'"):
        init_run_dir(cfg, RunDir(cfg.run_dir))
    assert not cfg.run_dir.exists()  # no data built, no config saved


def family_facts() -> list[str]:
    """What names a family: its classes' names, its model types, its audio placeholder tokens."""
    import importlib
    import inspect

    import transformers

    facts = set()
    for family in FAMILIES:
        facts.update(family.model_types)
        module = importlib.import_module(type(family).__module__)
        facts.update(
            name
            for name in re.findall(
                r"\b([A-Z]\w+(?:ForConditionalGeneration|Processor|Config|Model))\b",
                inspect.getsource(module),
            )
            if hasattr(transformers, name)
        )
        facts.update(
            re.findall(r"<\|?[A-Za-z_]*(?:audio|AUDIO|sound)[A-Za-z_]*\|?>", inspect.getsource(module))
        )
    # Shared by every family: the tokenizer and generation config classes, Whisper's features.
    return sorted(
        facts
        - {
            "PreTrainedTokenizerFast",
            "GenerationConfig",
            "WhisperFeatureExtractor",
            "PreTrainedModel",
            "AutoConfig",
            "AutoProcessor",
            "AutoModel",
        }
    )


def test_no_module_outside_distill_models_names_a_family():
    from pathlib import Path

    root = Path(__file__).resolve().parents[1]
    facts = family_facts()
    assert {"qwen2_audio", "Qwen2AudioForConditionalGeneration", "<|AUDIO|>"} <= set(facts)
    found = []
    for folder in ("distill", "data_pipelines", "bench", "scripts"):
        for path in sorted((root / folder).rglob("*.py")):
            if (root / "distill" / "models") in path.parents:
                continue
            for lineno, line in enumerate(path.read_text().splitlines(), 1):
                # The tiny model's default family is a config value, not a fact about a family.
                if path.name == "config.py" and line.strip() == 'family: str = "qwen2_audio"':
                    continue
                found += [f"{path.relative_to(root)}:{lineno}: {fact}" for fact in facts if fact in line]
    assert not found, "\n".join(found)


@pytest.mark.parametrize("family", [f.name for f in FAMILIES])
def test_make_tiny_model_builds_each_family_and_the_run_accepts_it(tmp_path, family):
    from distill.cli import main

    assert main(["make-tiny-model", str(tmp_path / "m"), "--family", family]) == 0
    assert check_model_dir(tmp_path / "m") is family_named(family)


def test_make_tiny_model_names_the_families_for_an_unknown_one(tmp_path, capsys):
    from distill.cli import main

    assert main(["make-tiny-model", str(tmp_path / "m"), "--family", "kimi_audio"]) == 2
    err = capsys.readouterr().err
    assert "--family='kimi_audio'" in err and all(f.name in err for f in FAMILIES)
    assert not (tmp_path / "m").exists()


def test_audio_a_family_cannot_take_is_refused_naming_the_key(tmp_path):
    from distill.data import check_model_audio
    from distill.models.config import TinyModelConfig
    from distill.models.registry import build_tiny_model

    af3 = build_tiny_model(tmp_path / "af3", TinyModelConfig(family="audio_flamingo3"))
    base = [
        f"output_dir={tmp_path}",
        f"model.path={af3}",
        "model.build_tiny=false",
        "engine.max_model_len=2048",
        "train.max_seq_len=2048",
        "cold_start.train.max_seq_len=2048",
    ]

    def cfg(*overrides):
        return load_config("configs/demo_cpu.yaml", [*base, *overrides])

    check_model_audio(cfg("data.audio.max_seconds=60"), af3)  # AF3 reads long audio itself, in windows
    with pytest.raises(
        ConfigError, match="data.audio.max_chunks=4: Audio Flamingo 3 takes at most 1 audio item"
    ):
        check_model_audio(cfg("data.audio.long_audio=chunk", "data.audio.max_chunks=4"), af3)
    with pytest.raises(
        ConfigError, match="data.audio.max_seconds=700: Audio Flamingo 3 .* reads at most 600 s"
    ):
        check_model_audio(cfg("data.audio.max_seconds=700"), af3)
