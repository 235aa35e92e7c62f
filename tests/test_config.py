import pytest

from distill.config import config_diff, load_config
from distill.core.schema import ConfigError


def write(tmp_path, text):
    path = tmp_path / "c.yaml"
    path.write_text(text)
    return path


def test_preset_and_overrides_merge(tmp_path):
    cfg = load_config(write(tmp_path, "run_name: r\nmodel: {path: m}\nsample: {n: 4}\n"), ["sample.n=6", "train.zero_stage=3"])
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
        ("run_name: r\nmodel: {path: m}\n", ["train.trainable.projector=false", "train.trainable.language_model=false"],
         "train.trainable"),
        ("run_name: r\nmodel: {path: m}\n", ["train.lora.enabled=true", "train.trainable.audio_encoder=true"],
         "train.lora.enabled"),
        ("run_name: r\nmodel: {path: m}\n", ["train.lora.enabled=true", "train.trainable.language_model=false"],
         "train.lora.enabled"),
        ("run_name: r\nmodel: {path: m}\n", ["train.offload_optimizer=true", "train.zero_stage=0",
                                              "train.num_processes=1"], "train.offload_optimizer"),
        ("run_name: r\nmodel: {path: m}\n", ["train.mix=[{kind: audio_cot, path: x}]"], "train.mix"),
        ("run_name: r\nmodel: {path: m}\n", ["train.mix=[{kind: text_cot, path: /nowhere.jsonl}]"], "train.mix"),
        ("run_name: r\nmodel: {path: m}\n", ["train.deepspeed_config=/nowhere.json"], "train.deepspeed_config"),
        ("run_name: r\nmodel: {path: m}\n", ["train.init=scratch"], "train.init"),
        ("run_name: r\nmodel: {path: m}\n", ["cold_start.train.init=base"], "cold_start.train.init"),
        ("run_name: r\nmodel: {path: m}\n", ["sample.top_p=1.5"], "sample.top_p"),
        ("run_name: r\nmodel: {path: m}\n", ["sample.n=0"], "sample.n"),
        ("run_name: r\nmodel: {path: m}\n", ["data.synthetic.families=[nope]"], "data.synthetic.families"),
        ("model: {path: m}\n", [], "run_name"),
        ("run_name: r\nmodel: {path: m}\n", ["bogus.key=1"], "bogus"),
        ("run_name: r\nmodel: {path: m}\n", ["sample.shard_index=3", "sample.num_shards=2"], "sample.shard_index"),
        ("run_name: r\nmodel: {path: m}\n", ["filter.checks=[format, spelling]"], "filter.checks"),
        ("run_name: r\nmodel: {path: m}\n", ["filter.keep_policy=random"], "filter.keep_policy"),
        ("run_name: r\nmodel: {path: m}\n", ["filter.pass_rate_min=0.8", "filter.pass_rate_max=0.5"],
         "filter.pass_rate_min"),
        ("run_name: r\nmodel: {path: m}\n", ["filter.max_repeats=1"], "filter.max_repeats"),
        ("run_name: r\nmodel: {path: m}\n", ["filter.reward_weights={bogus: 1}"], "filter.reward_weights"),
        ("run_name: r\nmodel: {path: m}\n", ["filter.reward_weights={correct: -1}"], "filter.reward_weights"),
        ("run_name: r\nmodel: {path: m}\n", ["filter.allowed_scripts=[klingon]"], "filter.allowed_scripts"),
        ("run_name: r\nmodel: {path: m}\n", ["filter.checks=[format]", "filter.pass_rate_min=0.3"],
         "filter.pass_rate_min"),
        ("run_name: r\nmodel: {path: m}\n", ["filter.checks=[format]", "sample.skip_solved=true"],
         "sample.skip_solved"),
        ("run_name: r\nmodel: {path: m}\n", ["filter.verifier=nocolon"], "filter.verifier"),
        ("run_name: r\nmodel: {path: m}\n", ["filter.judge.on_error=maybe"], "filter.judge.on_error"),
        ("run_name: r\nmodel: {path: m}\n", ["data.audio.long_audio=squash"], "data.audio.long_audio"),
        ("run_name: r\nmodel: {path: m}\n", ["data.train_mix=[{path: a.jsonl, weight: 0}]", "data.eval_manifest=e"],
         "data.train_mix"),
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
        ("engine.max_num_batched_tokens=512",
         "engine.max_num_batched_tokens=512: must be positive, and without chunked prefill at least engine.max_model_len"),
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
