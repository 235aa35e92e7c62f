"""The eval stage on the real engine (vLLM on CPU, the tiny model): the budget curve rests on
greedy decoding being prefix-consistent, counterfactual inputs are what they claim to be, an
MMAU-style benchmark with a bad item is read, matched and reported; then the report of the run
renders in headless Chromium and `distill status` reads the run."""

import json
import subprocess
import sys

import numpy as np
import pytest

from data_pipelines.synthetic import generate_split
from distill.config import load_config
from distill.eval import eval_stage
from distill.eval.scores import mmau_match
from distill.eval.stage import Evaluator
from distill.grounding.counterfactual import bank_length
from distill.io import read_json, read_jsonl
from distill.loop import init_run_dir
from distill.prompting import item_prompt
from distill.rollout.engine import EngineCache, generate
from distill.rundir import RunDir

pytestmark = pytest.mark.e2e

BUDGETS = [0, 4, 16]


def benchmark_file(tmp_path):
    """An MMAU-style JSON list (audio paths relative to the file) with one item whose audio is missing."""
    items = generate_split(tmp_path / "mmau", "eval", ["pitch_level"], 3, 5, 1, 16000)
    rows = [{"id": f"mmau-{i}", "audio_id": str(it.audio).split("mmau/", 1)[1], "question": it.question,
             "choices": it.choices, "answer": it.answer, "task": "sound", "sub-category": "pitch"}
            for i, it in enumerate(items)]
    rows.append({**rows[0], "id": "mmau-gone", "audio_id": "audio/nowhere.wav"})
    path = tmp_path / "mmau" / "test-mini.json"
    path.write_text(json.dumps(rows, indent=1))
    return path


def test_eval_stage_on_the_engine(tmp_path, tiny_model):
    bench = benchmark_file(tmp_path)
    cfg = load_config("configs/demo_cpu.yaml", [
        f"output_dir={tmp_path}", f"model.path={tiny_model}", "model.build_tiny=false",
        "data.synthetic.train_items=4", "data.synthetic.eval_items=4", "eval.max_tokens=16",
        f"eval.budgets=[{','.join(map(str, BUDGETS))}]", "eval.k=3", "eval.counterfactuals=[silence,swap]",
        f"eval.benchmarks=[{{name: mmau-mini, path: {bench}, format: mmau}}]"])
    run = RunDir(cfg.run_dir)
    data = init_run_dir(cfg, run)
    # The bad benchmark item is set aside with its file, line and reason; the rest are evaluated.
    rejects = list(read_jsonl(run.data_dir / "rejects" / "benchmark-mmau-mini.jsonl"))
    assert [r["reason"] for r in rejects] == ["missing_file"] and rejects[0]["where"].startswith(f"{bench}:")
    assert len(data.benchmarks["mmau-mini"]) == 3

    ev = Evaluator(cfg, tiny_model)
    base = [ev.request(it) for it in data.eval]
    cf = ev.counterfactual_requests(data.eval, base)
    answers = [it.answer for it in data.eval]
    assert len(set(answers)) == 2  # both answers occur, so every item has a partner that answers otherwise
    assert sorted(k for _, k, _ in cf) == ["silence"] * 4 + ["swap"] * 4
    for i, kind, request in cf:
        if kind == "silence":
            assert not any(chunk.any() for chunk in request.audio)
            assert [c.size for c in request.audio] == [bank_length(c.size, 4000) for c in base[i].audio]
        else:  # another item's recording, one whose answer differs
            partner = [j for j, r in enumerate(base) if len(r.audio) == len(request.audio) and all(
                a.shape == b.shape and np.array_equal(a, b) for a, b in zip(r.audio, request.audio, strict=True))]
            assert partner and partner[0] != i and answers[partner[0]] != answers[i]
        # The same question, with one audio placeholder per chunk of the audio it now carries.
        assert request.prompt == item_prompt(ev.tokenizer, data.eval[i], cfg.data.system_prompt,
                                             len(request.audio)) + cfg.sample.generation_prefix

    rd = run.round(1)
    rd.path.mkdir(parents=True)
    with EngineCache(cfg.engine, cfg.seed) as engines:
        stats = eval_stage(cfg, data.eval, tiny_model, rd, engines.get, data.benchmarks)
        # The curve cuts the full greedy trace at each budget: that is only the greedy trace of
        # that budget if greedy decoding is prefix-consistent. Check it on the engine.
        full = generate(engines.get(tiny_model), base, 0.0, 1.0, 16)
        short = generate(engines.get(tiny_model), base, 0.0, 1.0, 4)
        assert [f.token_ids[:4] for f in full] == [s.token_ids for s in short]

    rows = list(read_jsonl(rd.path / "eval_samples.jsonl"))
    assert len(rows) == stats["items"] == 4 and read_json(rd.eval_json) == stats
    for row in rows:
        assert list(row["budgets"]) == [str(b) for b in BUDGETS] and len(row["samples"]) == 3
        assert set(row["counterfactual"]) == {"silence", "swap"}
    cut = sum(1 for r in rows for b in BUDGETS if r["reasoning_tokens"] is None or r["reasoning_tokens"] > b)
    assert stats["requests"] == {"greedy": 4 * 3 + 3, "budget_answers": cut, "samples": 12}
    assert set(stats["pass_at"]) == {"1", "2", "3"} and 0 <= stats["majority_accuracy"] <= stats["pass_at"]["3"]
    assert set(stats["grounding"]["gap_by_kind"]) == {"silence", "swap"}
    assert stats["traces"]["greedy"]["traces"] == 4 and stats["traces"]["sampled"]["traces"] == 12
    b = stats["benchmarks"]["mmau-mini"]
    bench_rows = list(read_jsonl(rd.path / "eval_benchmarks" / "mmau-mini.jsonl"))
    assert b["items"] == len(bench_rows) == 3 and b["per_category"].keys() == {"sound"}
    for r in bench_rows:
        answer = r["completion"].rsplit("</think>", 1)[-1]
        assert r["mmau_correct"] == mmau_match(r["reference"], answer, r["choices"])

    # Where the run stands: the round has an eval on disk but no finished stage yet.
    cli = [sys.executable, "-m", "distill.cli"]
    done = subprocess.run([*cli, "status", str(run.path)], capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    assert "round 1: nothing finished yet" in done.stdout and "next: sample: 0/4 shards on disk" in done.stdout
