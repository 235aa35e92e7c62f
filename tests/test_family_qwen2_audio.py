from safetensors import safe_open

from distill.models.qwen2_audio import Qwen2Audio


def test_serving_layout_is_what_vllm_loads(tiny_model):
    with safe_open(str(tiny_model / "model.safetensors"), "pt") as f:
        keys = set(f.keys())
    assert "language_model.model.embed_tokens.weight" in keys
    assert "language_model.lm_head.weight" in keys
    assert not any(k.startswith(("model.", "language_model.model.model.")) for k in keys)


def test_tokenizer_keeps_think_tags_when_skipping_special_tokens(tiny_model):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tiny_model)
    ids = tok("<think>\nnear 900 Hz\n</think>\nhigh<|im_end|>", add_special_tokens=False)["input_ids"]
    assert tok.decode(ids, skip_special_tokens=True) == "<think>\nnear 900 Hz\n</think>\nhigh"
    assert tok.convert_tokens_to_ids("<|AUDIO|>") != tok.unk_token_id


def test_checkpoint_state_dict_renames_only_known_prefixes():
    sd = {
        "model.language_model.norm.weight": 1,
        "lm_head.weight": 2,
        "model.audio_tower.x": 3,
        "model.multi_modal_projector.linear.bias": 4,
        "audio_tower.conv1.bias": 5,
    }
    assert Qwen2Audio().checkpoint_state_dict(sd) == {
        "language_model.model.norm.weight": 1,
        "language_model.lm_head.weight": 2,
        "audio_tower.x": 3,
        "multi_modal_projector.linear.bias": 4,
        "audio_tower.conv1.bias": 5,
    }


def test_make_tiny_model_cli_builds_once_and_never_overwrites(tmp_path, capsys):
    from distill.cli import main

    out = tmp_path / "m"
    assert main(["make-tiny-model", str(out)]) == 0
    assert {"model.safetensors", "config.json", "chat_template.jinja", "tokenizer.json"} <= {
        p.name for p in out.iterdir()
    }
    assert main(["make-tiny-model", str(out)]) == 1
    assert "not empty" in capsys.readouterr().err
