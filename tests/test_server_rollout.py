"""The server rollout backend's requests and partial shards (no server needed)."""

import json

import jinja2
import numpy as np
import pytest

from data_pipelines.items import Item
from distill.config import load_config
from distill.rollout.server import completions_of, item_body, read_partial

# Published with the Step-Audio-R1.1 model card for `vllm serve --chat-template` (shell quoting removed).
STEP_AUDIO_TEMPLATE = "configs/step-audio-r1.1-chat-template.jinja"


def test_requests_render_as_step_audio_turns_through_its_published_template():
    """The preset's request, as a Step-Audio-R1.1 server renders it: system, human turn with one
    <audio_patch> per 25 s audio part, then the assistant turn opened with <think>\\n and left open."""
    from pathlib import Path

    cfg = load_config("configs/step_audio_r1_server.yaml")
    item = Item(
        id="a", audio="a.wav", question="Which tone is higher?", answer="first", choices=["first", "second"]
    )
    body = item_body(cfg, item, [np.zeros(40 * 16000, dtype=np.float32)], seed=3)
    assert (
        body["continue_final_message"]
        and not body["add_generation_prompt"]
        and not body["skip_special_tokens"]
    )
    assert body["n"] == 8 and body["seed"] == 3 and body["max_tokens"] == 8192
    # vLLM turns each input_audio part into the model's audio placeholder; the template sees "audio".
    messages = [
        {**m, "content": [{"type": "audio"} if p["type"] == "input_audio" else p for p in m["content"]]}
        if isinstance(m["content"], list)
        else m
        for m in body["messages"]
    ]
    text = jinja2.Template(Path(STEP_AUDIO_TEMPLATE).read_text()).render(
        messages=messages, add_generation_prompt=False
    )
    assert text == (
        f"<|BOT|>system\n{cfg.data.system_prompt}<|EOT|>"
        "<|BOT|>human\n<audio_patch><audio_patch>Which tone is higher?\nOptions: first, second.<|EOT|>"
        "<|BOT|>assistant\n<think>\n"
    )


def test_partial_shards_keep_whole_items_and_drop_a_cut_line(tmp_path):
    path = tmp_path / ".shard.partial.jsonl"
    rows = [
        {"item_id": "a", "completions": [{"text": "x", "finish_reason": "stop"}]},
        {"item_id": "b", "completions": [{"text": "y", "finish_reason": "length"}]},
    ]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows) + '{"item_id": "c", "compl')
    assert read_partial(path) == {"a": rows[0]["completions"], "b": rows[1]["completions"]}
    assert read_partial(tmp_path / "absent") == {}


def test_replies_need_all_n_choices_in_order():
    reply = {
        "choices": [
            {"index": 1, "message": {"content": "b"}, "finish_reason": "length"},
            {"index": 0, "message": {"content": "a"}, "finish_reason": "stop"},
        ]
    }
    assert [c["text"] for c in completions_of(reply, 2)] == ["a", "b"]
    with pytest.raises(ValueError, match="2 choices for n=3"):
        completions_of(reply, 3)
