import pytest

from distill.config import load_config
from distill.io import atomic_write_jsonl, read_jsonl
from distill.rewards.filter import filter_stage
from distill.rundir import RunDir

GOOD = "<think>\nnear 900 Hz, above 500 Hz\n</think>\nhigh"
WRONG = "<think>\nnear 300 Hz\n</think>\nlow"


def trace(item, j, completion, model_dir, finish="stop"):
    return {"trace_id": f"{item}#{j}", "item_id": item, "sample_index": j, "audio": "a.wav", "prompt": "p",
            "completion": completion, "finish_reason": finish, "reference": "high", "choices": ["high", "low"],
            "lineage": {"model_dir": str(model_dir), "model_sha256": "x"}}


@pytest.fixture
def round_dir(tmp_path, tiny_model):
    cfg = load_config("configs/demo_cpu.yaml", [f"output_dir={tmp_path}", "sample.num_shards=2",
                                                "filter.keep_per_prompt=2"])
    rd = RunDir(cfg.run_dir).round(1)
    a = [trace("a", j, GOOD, tiny_model) for j in range(3)]  # all pass, one over the cap
    b = [trace("b", 0, WRONG, tiny_model), trace("b", 1, GOOD + "<|im_start|>", tiny_model),
         trace("b", 2, GOOD, tiny_model, finish="length")]  # none pass
    c = [trace("c", 0, "high", tiny_model), trace("c", 1, GOOD, tiny_model), trace("c", 2, WRONG, tiny_model)]
    atomic_write_jsonl(rd.shard_path(0, 2), a + c[:1])
    atomic_write_jsonl(rd.shard_path(1, 2), b + c[1:])
    return cfg, rd, tiny_model


def test_filter_keeps_passing_traces_up_to_k_and_says_why_others_failed(round_dir):
    cfg, rd, model = round_dir
    stats = filter_stage(cfg, rd, model)
    kept = {t["trace_id"] for t in read_jsonl(rd.filtered)}
    assert kept == {"a#0", "a#1", "c#1"}
    reasons = {t["trace_id"]: t["rejected_because"] for t in read_jsonl(rd.rejected)}
    assert reasons == {
        "a#2": ["over_keep_per_prompt"],
        "b#0": ["answer:wrong"],
        "b#1": ["control_tokens", "answer:wrong"],
        "b#2": ["truncated"],
        "c#0": ["format:think_block", "answer:missing"],
        "c#2": ["answer:wrong"],
    }
    assert stats["traces"] == 9 and stats["kept"] == 3
    assert stats["rejected_by_reason"] == {"answer:wrong": 2, "over_keep_per_prompt": 1, "control_tokens": 1,
                                           "truncated": 1, "format:think_block": 1}
    assert stats["failures_by_check"]["answer:wrong"] == 3 and stats["failures_by_check"]["answer:missing"] == 1
    assert stats["prompts_all_failed"] == 1 and stats["all_failed_ids"] == ["b"]
    assert stats["prompts_all_passed"] == 1
    assert stats["sample_accuracy"] == round(5 / 9, 4)


def test_filter_refuses_missing_shard(round_dir):
    cfg, rd, model = round_dir
    rd.shard_path(1, 2).unlink()
    with pytest.raises(FileNotFoundError, match=r"sample shard\(s\) \[1\] of 2 missing"):
        filter_stage(cfg, rd, model)
