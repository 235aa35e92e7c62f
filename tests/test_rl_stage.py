"""The rl stage's decisions before any training: the band it writes for the trainer, an empty
band that skips or stops the stage as configured, and the SFT stage a round without SFT skips."""

import json

import pytest

from data_pipelines.items import Item
from distill.config import load_config
from distill.core.files import atomic_write_text, read_json
from distill.core.rundir import RunDir
from distill.core.stages import StageContext
from distill.data import Datasets
from distill.rl import stage as rl_stage
from distill.rollout.engine import EngineCache
from distill.training import stage as train_stage


def items(n: int) -> list[Item]:
    return [Item(f"q{i}", f"/audio/{i}.wav", "High or low?", "high" if i % 2 else "low") for i in range(n)]


def context(tmp_path, tiny_model, right: dict[str, int], *overrides: str) -> StageContext:
    """Round 1 with sample shards where item q<i> has right[q<i>] of 4 traces right."""
    cfg = load_config(
        "configs/demo_cpu.yaml",
        [
            f"output_dir={tmp_path}",
            "sample.n=4",
            "sample.num_shards=1",
            "rl.enabled=true",
            "rl.band=[1,3]",
            *overrides,
        ],
    )
    run = RunDir(cfg.run_dir)
    rd = run.round(1)
    pool = items(len(right))
    rows = []
    for it in pool:
        wrong = "low" if it.answer == "high" else "high"
        for j in range(4):
            answer = it.answer if j < right[it.id] else wrong
            rows.append(
                {
                    "item_id": it.id,
                    "completion": f"<think>\nThe tone is steady.\n</think>\n{answer}",
                    "num_tokens": 9,
                    "reasoning_tokens": 5,
                    "finish_reason": "stop",
                    "question": it.question,
                    "reference": it.answer,
                    "choices": None,
                }
            )
    atomic_write_text(rd.shard_path(0, 1), "".join(json.dumps(r) + "\n" for r in rows))
    return StageContext(cfg, run, rd, tiny_model, Datasets(pool, [], pool), EngineCache(cfg.engine, cfg.seed))


def test_the_band_holds_the_items_solved_sometimes_with_their_swap_partners(tmp_path, tiny_model):
    ctx = context(tmp_path, tiny_model, {"q0": 0, "q1": 2, "q2": 4, "q3": 3, "q4": 1})
    record = rl_stage.write_band(ctx.cfg, ctx.rd, ctx.data.train, tiny_model)
    assert [it["id"] for it in record["items"]] == ["q1", "q3", "q4"]
    assert record["pass_counts"]["q2"] == [4, 4] and record["band"] == [1, 3]
    assert set(record["partners"]) == {"q1", "q3", "q4"}
    assert read_json(ctx.rd.rl_dir / "band.json") == record


def test_an_empty_band_skips_the_stage_or_stops_it_as_configured(tmp_path, tiny_model):
    right = {"q0": 0, "q1": 4, "q2": 4}
    stats = rl_stage.run(context(tmp_path / "skip", tiny_model, right))
    assert stats["steps"] == 0
    assert (
        "no item has 1 to 3 traces right (rl.band): of 3 items, 1 have fewer and 2 more" in stats["skipped"]
    )
    ctx = context(tmp_path / "fail", tiny_model, right, "rl.on_empty_band=fail")
    with pytest.raises(rl_stage.EmptyBandStop, match="rl.on_empty_band=fail"):
        rl_stage.run(ctx)
    assert not ctx.rd.rl_dir.joinpath("final").exists()


def test_rl_instead_of_sft_skips_training_and_hands_on_the_model_when_the_band_is_empty(tmp_path, tiny_model):
    ctx = context(tmp_path, tiny_model, {"q0": 0, "q1": 4}, "rl.mode=instead_of_train")
    assert "rl.mode=instead_of_train" in train_stage.run(ctx)["skipped"]
    stats = rl_stage.run(ctx)
    assert stats["steps"] == 0
    # The export reads rl/final: the round's own model, unchanged.
    assert ctx.rd.policy == ctx.rd.rl_dir / "final"
    assert (ctx.rd.policy / "model.safetensors").read_bytes() == (
        tiny_model / "model.safetensors"
    ).read_bytes()
    assert read_json(ctx.rd.policy / "rl_summary.json")["steps"] == 0
    # Killed after the hand-on, before the marker: the stage runs again and finds it done.
    assert rl_stage.run(ctx) == read_json(ctx.rd.policy / "rl_summary.json")
