import ast
import sys
from pathlib import Path

import pytest
from omegaconf import OmegaConf

from distill.config import Config, config_diff, load_config, resumable, to_yaml
from distill.core.schema import ConfigError


def write(tmp_path, text):
    path = tmp_path / "c.yaml"
    path.write_text(text)
    return path


def test_preset_and_overrides_merge(tmp_path):
    cfg = load_config(
        write(tmp_path, "run_name: r\nmodel: {path: m}\nsample: {n: 4}\n"),
        ["sample.n=6", "train.zero_stage=3"],
    )
    assert cfg.sample.n == 6 and cfg.train.zero_stage == 3 and cfg.run_name == "r"


def test_demo_preset_is_valid():
    cfg = load_config("configs/demo_cpu.yaml")
    assert cfg.model.build_tiny and cfg.model.path == "checkpoints/demo_cpu/base_model"


@pytest.mark.parametrize(
    ("text", "overrides", "key"),
    [
        ("run_name: r\nmodel: {path: m}\nsample: {nn: 4}\n", [], "nn"),
        ("run_name: r\nmodel: {path: m}\n", ["sample.n=lots"], "sample.n"),
        ("run_name: r\nmodel: {path: m}\n", ["train.zero_stage=4"], "train.zero_stage"),
        (
            "run_name: r\nmodel: {path: m}\n",
            ["train.trainable.projector=false", "train.trainable.language_model=false"],
            "train.trainable",
        ),
        (
            "run_name: r\nmodel: {path: m}\n",
            ["train.lora.enabled=true", "train.trainable.audio_encoder=true"],
            "train.lora.enabled",
        ),
        (
            "run_name: r\nmodel: {path: m}\n",
            ["train.lora.enabled=true", "train.trainable.language_model=false"],
            "train.lora.enabled",
        ),
        (
            "run_name: r\nmodel: {path: m}\n",
            ["train.offload_optimizer=true", "train.zero_stage=0", "train.num_processes=1"],
            "train.offload_optimizer",
        ),
        ("run_name: r\nmodel: {path: m}\n", ["train.mix=[{kind: audio_cot, path: x}]"], "train.mix"),
        (
            "run_name: r\nmodel: {path: m}\n",
            ["train.mix=[{kind: text_cot, path: /nowhere.jsonl}]"],
            "train.mix",
        ),
        (
            "run_name: r\nmodel: {path: m}\n",
            ["train.deepspeed_config=/nowhere.json"],
            "train.deepspeed_config",
        ),
        ("run_name: r\nmodel: {path: m}\n", ["train.init=scratch"], "train.init"),
        ("run_name: r\nmodel: {path: m}\n", ["cold_start.train.init=base"], "cold_start.train.init"),
        ("run_name: r\nmodel: {path: m}\n", ["sample.top_p=1.5"], "sample.top_p"),
        ("run_name: r\nmodel: {path: m}\n", ["sample.n=0"], "sample.n"),
        ("run_name: r\nmodel: {path: m}\n", ["data.synthetic.families=[nope]"], "data.synthetic.families"),
        ("model: {path: m}\n", [], "run_name"),
        ("run_name: r\nmodel: {path: m}\n", ["bogus.key=1"], "bogus"),
        (
            "run_name: r\nmodel: {path: m}\n",
            ["sample.shard_index=3", "sample.num_shards=2"],
            "sample.shard_index",
        ),
        ("run_name: r\nmodel: {path: m}\n", ["filter.checks=[format, spelling]"], "filter.checks"),
        ("run_name: r\nmodel: {path: m}\n", ["filter.keep_policy=random"], "filter.keep_policy"),
        (
            "run_name: r\nmodel: {path: m}\n",
            ["filter.pass_rate_min=0.8", "filter.pass_rate_max=0.5"],
            "filter.pass_rate_min",
        ),
        ("run_name: r\nmodel: {path: m}\n", ["filter.max_repeats=1"], "filter.max_repeats"),
        ("run_name: r\nmodel: {path: m}\n", ["filter.reward_weights={bogus: 1}"], "filter.reward_weights"),
        ("run_name: r\nmodel: {path: m}\n", ["filter.reward_weights={correct: -1}"], "filter.reward_weights"),
        ("run_name: r\nmodel: {path: m}\n", ["filter.allowed_scripts=[klingon]"], "filter.allowed_scripts"),
        (
            "run_name: r\nmodel: {path: m}\n",
            ["filter.checks=[format]", "filter.pass_rate_min=0.3"],
            "filter.pass_rate_min",
        ),
        (
            "run_name: r\nmodel: {path: m}\n",
            ["filter.checks=[format]", "sample.skip_solved=true"],
            "sample.skip_solved",
        ),
        ("run_name: r\nmodel: {path: m}\n", ["filter.verifier=nocolon"], "filter.verifier"),
        ("run_name: r\nmodel: {path: m}\n", ["filter.judge.on_error=maybe"], "filter.judge.on_error"),
        ("run_name: r\nmodel: {path: m}\n", ["data.audio.long_audio=squash"], "data.audio.long_audio"),
        (
            "run_name: r\nmodel: {path: m}\n",
            ["data.train_mix=[{path: a.jsonl, weight: 0}]", "data.eval_manifest=e"],
            "data.train_mix",
        ),
    ],
)
def test_bad_keys_and_values_name_the_key(tmp_path, text, overrides, key):
    with pytest.raises(ConfigError, match=key.replace(".", r"\.")):
        load_config(write(tmp_path, text), overrides)


def test_config_diff_lists_changed_keys(tmp_path):
    path = write(tmp_path, "run_name: r\nmodel: {path: m}\n")
    a = load_config(path)
    b = load_config(path, ["sample.n=3", "train.learning_rate=0.1"])
    assert config_diff(a, b) == ["sample.n", "train.learning_rate"]
    assert config_diff(a, load_config(path)) == []


def test_unreadable_and_malformed_yaml(tmp_path):
    with pytest.raises(ConfigError, match="nope.yaml: cannot read"):
        load_config(tmp_path / "nope.yaml")
    with pytest.raises(ConfigError, match="c.yaml: not valid YAML"):
        load_config(write(tmp_path, "run_name: [unclosed\n"))


def test_override_errors_say_so(tmp_path):
    with pytest.raises(ConfigError, match="in a command-line override"):
        load_config(write(tmp_path, "run_name: r\nmodel: {path: m}\n"), ["sample.n=lots"])
    with pytest.raises(ConfigError, match="c.yaml"):
        load_config(write(tmp_path, "run_name: r\nmodel: {path: m}\nsample: {n: lots}\n"))


@pytest.mark.parametrize(
    ("override", "message"),
    [
        ("cold_start.items=-1", "cold_start.items=-1: must be >= 0"),
        ("train.grad_accum=0", "train.grad_accum=0: must be positive"),
        ("data.synthetic.families=[]", "give at least one family"),
        ("data.synthetic.difficulty=7", "data.synthetic.difficulty=7: must be one of"),
        (
            "engine.max_num_batched_tokens=512",
            "engine.max_num_batched_tokens=512: must be positive, "
            "and without chunked prefill at least engine.max_model_len",
        ),
        ("engine.block_size=0", "engine.block_size=0: must be positive"),
    ],
)
def test_more_bad_values(tmp_path, override, message):
    with pytest.raises(ConfigError, match=message.replace("[", r"\[").replace(".", r"\.")):
        load_config(write(tmp_path, "run_name: r\nmodel: {path: m}\n"), [override])


def test_token_budgets_and_tiny_head_size(tmp_path):
    path = write(tmp_path, "run_name: r\nmodel: {path: m, build_tiny: true}\n")
    with pytest.raises(ConfigError, match="sample.max_tokens=2048: must be below engine.max_model_len=1024"):
        load_config(path, ["sample.max_tokens=2048"])
    with pytest.raises(ConfigError, match="head size must be one of"):
        load_config(path, ["model.tiny.text_heads=8"])
    assert load_config(path, ["model.tiny.text_heads=4"]).model.tiny.text_heads == 4  # head size 32


@pytest.mark.parametrize(
    "preset", sorted((Path(__file__).parents[1] / "configs").glob("*.yaml")), ids=lambda p: p.name
)
def test_every_preset_loads_and_its_saved_config_loads_again(tmp_path, preset):
    # load_config checks no manifest or model path, so the presets' placeholders need no override.
    cfg = load_config(preset)
    saved = write(tmp_path, to_yaml(cfg))  # what a run stores as config.yaml, and a resume reads
    assert to_yaml(load_config(saved)) == to_yaml(cfg)


# The resumable keys as distill/config.py listed them before each section declared its own.
OLD_RESUMABLE_CHANGES = (
    "loop.rounds",
    "wandb.mode",
    "wandb.project",
    "sample.shard_index",
    "data.audio.workers",
    "filter.judge.concurrency",
    "filter.judge.timeout_s",
    "filter.judge.retries",
    "filter.judge.backoff_s",
    "train.save_steps",
    "cold_start.train.save_steps",
    "train.audio_encoder_cache_mb",
    "cold_start.train.audio_encoder_cache_mb",
    "train.collective_timeout_s",
    "cold_start.train.collective_timeout_s",
    "grounding.real_logprobs",
    "grounding.reuse_prefix_cache",
    "sample.server.base_url",
    "sample.server.api_key_env",
    "sample.server.timeout_s",
    "sample.server.retries",
    "sample.server.backoff_s",
    "sample.server.concurrency",
    # The rl section's (issue 26): how often it saves, and when it warns.
    "rl.save_every",
    "rl.collapse_warn_fraction",
)


def schema_keys(tree: dict, prefix: str = "") -> list[str]:
    return [
        k
        for key, value in tree.items()
        for k in (schema_keys(value, f"{prefix}{key}.") if isinstance(value, dict) else [f"{prefix}{key}"])
    ]


def test_resumable_keys_are_those_of_the_old_table():
    keys = schema_keys(OmegaConf.to_container(OmegaConf.structured(Config)))
    keys += [
        *OLD_RESUMABLE_CHANGES,
        "slurm.partition",
        "slurm.anything",
        "wandb.entity",
        "cold_start.save_steps",
    ]
    assert len(keys) > 150
    for key in keys:
        assert resumable(key) == (key in OLD_RESUMABLE_CHANGES or key.startswith("slurm.")), key


SECTION_MODULES = (
    "data_pipelines/config.py",
    "distill/models/config.py",
    "distill/rollout/config.py",
    "distill/grounding/config.py",
    "distill/filter/config.py",
    "distill/training/config.py",
    "distill/export/config.py",
    "distill/eval/config.py",
)


@pytest.mark.parametrize("path", SECTION_MODULES)
def test_a_section_config_imports_no_stage_code(path):
    """A section's config module imports the stdlib, omegaconf, distill.core and other sections'
    config modules only (data_pipelines/config.py also its own package), so stage code imports
    constants from it and never the other way around."""
    allowed = (
        "omegaconf",
        "distill.core",
        *(m.removesuffix(".py").replace("/", ".") for m in SECTION_MODULES),
    )
    if path.startswith("data_pipelines"):
        allowed += ("data_pipelines",)
    for node in ast.walk(ast.parse(Path(path).read_text())):
        if isinstance(node, ast.Import | ast.ImportFrom):
            names = [node.module] if isinstance(node, ast.ImportFrom) else [a.name for a in node.names]
            for name in names:
                top = name.split(".")[0]
                assert top in sys.stdlib_module_names or top == "__future__" or name.startswith(allowed), (
                    path,
                    name,
                )
