import pytest

from distill.config import load_config
from distill.core.files import atomic_write_jsonl, read_json, read_jsonl
from distill.core.rundir import RunDir
from distill.filter.stage import filter_stage

GOOD = "<think>\nnear 900 Hz, above 500 Hz\n</think>\nhigh"
WRONG = "<think>\nnear 300 Hz\n</think>\nlow"


def trace(item, j, completion, model_dir, finish="stop"):
    return {
        "trace_id": f"{item}#{j}",
        "item_id": item,
        "sample_index": j,
        "audio": "a.wav",
        "prompt": "p",
        "completion": completion,
        "finish_reason": finish,
        "reference": "high",
        "choices": ["high", "low"],
        "lineage": {"model_dir": str(model_dir), "model_sha256": "x"},
    }


@pytest.fixture
def round_dir(tmp_path, tiny_model):
    cfg = load_config(
        "configs/demo_cpu.yaml",
        [
            f"output_dir={tmp_path}",
            "sample.num_shards=2",
            "filter.keep_per_prompt=2",
            "grounding.enabled=false",
        ],
    )
    rd = RunDir(cfg.run_dir).round(1)
    a = [trace("a", j, GOOD, tiny_model) for j in range(3)]  # all pass, one over the cap
    b = [
        trace("b", 0, WRONG, tiny_model),
        trace("b", 1, GOOD + "<|im_start|>", tiny_model),
        trace("b", 2, GOOD, tiny_model, finish="length"),
    ]  # none pass
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
    assert stats["rejected_by_reason"] == {
        "answer:wrong": 2,
        "over_keep_per_prompt": 1,
        "control_tokens": 1,
        "truncated": 1,
        "format:think_block": 1,
    }
    assert (
        stats["failures_by_check"]["answer:wrong"] == 3 and stats["failures_by_check"]["answer:missing"] == 1
    )
    # Always failed / solved count correct answers: b#2 was cut off but answered right.
    assert stats["prompts_all_failed"] == 0 and stats["prompts_all_solved"] == 1
    assert read_json(rd.set_aside) == {"always_failed": [], "always_solved": ["a"]}
    assert stats["sample_accuracy"] == round(5 / 9, 4)


def test_filter_refuses_missing_shard(round_dir):
    cfg, rd, model = round_dir
    rd.shard_path(1, 2).unlink()
    with pytest.raises(FileNotFoundError, match=r"sample shard\(s\) \[1\] of 2 missing"):
        filter_stage(cfg, rd, model)


def test_filter_band_policy_reward_and_categories(tmp_path, tiny_model):
    cfg = load_config(
        "configs/demo_cpu.yaml",
        [
            f"output_dir={tmp_path}",
            "sample.num_shards=1",
            "filter.keep_per_prompt=1",
            "filter.keep_policy=shortest",
            "grounding.enabled=false",
            "filter.pass_rate_min=0.25",
            "filter.pass_rate_max=0.75",
            "filter.reward_weights={correct: 0.8, format: 0.2}",
        ],
    )
    rd = RunDir(cfg.run_dir).round(1)
    long_good = "<think>\nnear 900 Hz, well above the 500 Hz boundary, so it is high\n</think>\nhigh"
    lonely = "<think>\nI cannot hear the audio, so I guess it is high\n</think>\nhigh"
    rows = [
        # "a": 2 of 4 right -> in the band; the shorter passing trace is kept
        *(trace("a", j, t, tiny_model) for j, t in enumerate([long_good, GOOD, WRONG, WRONG])),
        # "s": 4 of 4 right -> always solved, outside the band
        *(trace("s", j, GOOD, tiny_model) for j in range(4)),
        # "f": none right (one also claims it cannot hear) -> always failed
        *(
            trace("f", j, t, tiny_model)
            for j, t in enumerate([WRONG, WRONG, WRONG, lonely.replace("high", "low")])
        ),
    ]
    for r in rows:
        r["category"] = "music" if r["item_id"] == "f" else "sound"
    atomic_write_jsonl(rd.shard_path(0, 1), rows)
    stats = filter_stage(cfg, rd, tiny_model)
    kept = list(read_jsonl(rd.filtered))
    assert [t["trace_id"] for t in kept] == ["a#1"]
    assert kept[0]["reward"] == 1.0 and set(kept[0]["checks"].values()) == {"pass"}
    rejected = {t["trace_id"]: t for t in read_jsonl(rd.rejected)}
    assert rejected["a#0"]["rejected_because"] == ["over_keep_per_prompt"]
    assert rejected["s#0"]["rejected_because"] == ["prompt:pass_rate"]
    assert rejected["a#2"]["reward"] == 0.2 and rejected["a#2"]["checks"]["correct"] == "answer:wrong"
    # Claiming not to hear, it cites no acoustic property either.
    assert rejected["f#3"]["rejected_because"] == [
        "self_cognition",
        "answer:wrong",
        "lexical:no_acoustic_terms",
    ]
    assert (
        stats["prompts_out_of_band"] == 2
        and stats["prompts_all_solved"] == 1
        and stats["all_failed_ids"] == ["f"]
    )
    assert stats["by_category"] == {
        "music": {"answer:wrong": 3, "self_cognition": 1},
        "sound": {"prompt:pass_rate": 4, "answer:wrong": 2, "kept": 1, "over_keep_per_prompt": 1},
    }
    assert read_json(rd.set_aside) == {"always_failed": ["f"], "always_solved": ["s"]}
    assert stats["rule_checks_per_s"] > 0


def test_filter_checks_can_be_switched_off(round_dir):
    cfg, rd, model = round_dir
    from dataclasses import replace

    cfg.filter = replace(cfg.filter, checks=["format", "correct"])
    filter_stage(cfg, rd, model)
    kept = {t["trace_id"] for t in read_jsonl(rd.filtered)}
    assert "b#2" in kept  # truncated and control-token traces are no longer rejected for it
    assert set(next(read_jsonl(rd.filtered))["checks"]) == {"format", "correct"}
    # Without the correctness check nothing counts as solved or failed.
    cfg.filter = replace(cfg.filter, checks=["format"])
    stats = filter_stage(cfg, rd, model)
    assert (
        stats["prompts_all_solved"] == stats["prompts_all_failed"] == 0 and stats["sample_accuracy"] is None
    )
    assert read_json(rd.set_aside) == {"always_failed": [], "always_solved": []}
