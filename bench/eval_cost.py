"""Benchmark: what per-round evaluation costs, as a share of the round, and what one engine with
prefix caching saves against doing the same work the straightforward way.

    .venv/bin/python bench/eval_cost.py [--run-dir checkpoints/demo_cpu] [--out bench/results/eval_cost.json]

1. Runs (or resumes; a finished run costs nothing) the CPU demo loop, configs/demo_cpu.yaml, and
   reports, per round, the eval stage's seconds as a share of all the round's stage seconds.
2. Re-times eval in two settings, in this run: the demo's last round (its exported model, the 64
   held-out items, traces of about 30 tokens), and long traces (a random tiny model that never
   closes its reasoning, 64 items, up to 512 tokens, budgets 0/128/256/512, no samples):
   - distill: `eval_stage` as the loop runs it: one engine, prefix caching on, greedy traces for
     the real audio and the counterfactuals in one batch, each budget's answer continuing the
     greedy trace cut at the budget;
   - baseline: the same measurements done the obvious way on an engine without prefix caching:
     each counterfactual its own pass, each budget decoded from scratch (greedy up to the budget),
     then its forced answer.
   Both start from cold caches (prefix and multimodal caches reset), fastest of 2 runs each.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import time
from dataclasses import replace
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def baseline_eval(cfg, items, model_dir: Path, llm) -> None:
    """The eval's measurements without sharing: every pass prepares its prompts from scratch."""
    from distill.eval.stage import Evaluator, budget_continuation

    e = cfg.eval
    ev = Evaluator(cfg, model_dir)
    base = [ev.request(it) for it in items]
    ev.generate(llm, base, e.max_tokens)
    cf = ev.counterfactual_requests(items, base)
    for kind in e.counterfactuals:
        ev.generate(llm, [r for _, k, r in cf if k == kind], e.max_tokens)
    for b in e.thinking_budgets:
        outs = ev.generate(llm, base, b) if b else [None] * len(base)
        conts = [
            e.force_answer if out is None else budget_continuation(out, b, ev.tokenizer, e.force_answer)
            for out in outs
        ]
        ev.generate(
            llm,
            [replace(r, prompt=r.prompt + c) for r, c in zip(base, conts, strict=True) if c],
            e.answer_max_tokens,
        )
    if e.k:
        ev.generate(llm, base, e.max_tokens, e.temperature, e.top_p, n=e.k)


def cold(llm) -> None:
    llm.reset_prefix_cache()
    llm.reset_mm_cache()


def time_both(cfg, data, model_dir: Path, repeats: int) -> dict:
    """distill's eval and the baseline on the same model and items, from cold caches, fastest of `repeats`."""
    from distill.core.rundir import RoundDir
    from distill.eval.stage import eval_stage
    from distill.rollout.engine import EngineCache

    timings: dict[str, list[float]] = {"distill": [], "baseline": []}
    with tempfile.TemporaryDirectory() as tmp:
        model = (
            Path(tmp) / "model"
        )  # a copy without the export manifest: eval leaves a run's model card alone
        shutil.copytree(model_dir, model, ignore=shutil.ignore_patterns("distill_export.json"))
        scratch = RoundDir(Path(tmp), 1)
        scratch.path.mkdir()
        with EngineCache(cfg.engine, cfg.seed) as engines:
            llm = engines.get(model)
            for _ in range(repeats):
                cold(llm)
                t = time.time()
                stats = eval_stage(cfg, data.eval, model, scratch, engines.get, data.benchmarks)
                timings["distill"].append(time.time() - t)
        with EngineCache(replace(cfg.engine, enable_prefix_caching=False), cfg.seed) as engines:
            llm = engines.get(model)
            for _ in range(repeats):
                cold(llm)
                t = time.time()
                baseline_eval(cfg, data.eval, model, llm)
                timings["baseline"].append(time.time() - t)
    best = {k: min(v) for k, v in timings.items()}
    return {
        "items": len(data.eval),
        "max_tokens": cfg.eval.max_tokens,
        "k": cfg.eval.k,
        "budgets": cfg.eval.thinking_budgets,
        "counterfactuals": list(cfg.eval.counterfactuals),
        "requests": stats["requests"],
        "mean_greedy_tokens": stats["mean_tokens"],
        "distill_seconds": round(best["distill"], 2),
        "baseline_seconds": round(best["baseline"], 2),
        "baseline_over_distill": round(best["baseline"] / best["distill"], 3),
        "all_runs": {k: [round(x, 2) for x in v] for k, v in timings.items()},
    }


def long_traces(out: Path, repeats: int) -> dict:
    """A random tiny model that never closes its reasoning: every budget cuts, traces of 512 tokens."""
    from distill.config import load_config
    from distill.core.rundir import RunDir
    from distill.loop import init_run_dir

    cfg = load_config(
        "configs/demo_cpu.yaml",
        [
            f"output_dir={out}",
            "run_name=long",
            "data.synthetic.train_items=8",
            "data.synthetic.eval_items=64",
            "eval.max_tokens=512",
            "eval.budgets=[0,128,256,512]",
            "eval.k=0",
            "engine.max_model_len=1536",
            "train.max_seq_len=1536",
            "cold_start.train.max_seq_len=1536",
        ],
    )
    data = init_run_dir(cfg, RunDir(cfg.run_dir))
    return time_both(cfg, data, Path(cfg.model.path), repeats)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--run-dir", default="checkpoints/demo_cpu")
    parser.add_argument("--out", default="bench/results/eval_cost.json")
    parser.add_argument("--repeats", type=int, default=2)
    args = parser.parse_args()
    os.environ.setdefault("WANDB_MODE", "disabled")
    from distill.config import load_config
    from distill.core.rundir import RunDir
    from distill.data import prepare_data

    run_dir = Path(args.run_dir)
    overrides = [f"output_dir={run_dir.parent}", f"run_name={run_dir.name}"]
    t0 = time.time()
    subprocess.run(
        [sys.executable, "-m", "distill.cli", "run", "configs/demo_cpu.yaml", *overrides], check=True
    )
    loop_seconds = time.time() - t0
    run = RunDir(run_dir)
    shares = {}
    for rd in run.rounds():
        seconds = {s: v["seconds"] for s, v in rd.stats().items()}
        shares[rd.index] = {
            "eval_seconds": seconds["eval"],
            "round_seconds": round(sum(seconds.values()), 2),
            "eval_share": round(seconds["eval"] / sum(seconds.values()), 4),
            "stages": seconds,
        }
    cfg = load_config(run.config)
    last = run.rounds()[-1]
    demo = {
        "round": last.index,
        **time_both(cfg, prepare_data(cfg, run.data_dir), last.model_dir, args.repeats),
    }
    with tempfile.TemporaryDirectory() as tmp:
        long = long_traces(Path(tmp), args.repeats)
    result = {
        "machine": {"cpus": os.cpu_count(), "platform": platform.platform()},
        "run_dir": str(run_dir),
        "loop_seconds_this_call": round(loop_seconds, 1),
        "eval_share_by_round": shares,
        "demo_last_round_eval": demo,
        "long_traces_eval": long,
    }
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
