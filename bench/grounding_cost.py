"""Benchmark: the ground stage's time as a share of the sample stage's, on the same items, with the
same vLLM engine (opened once, reused from sampling to grounding, as the loop does).

    .venv/bin/python bench/grounding_cost.py [--out bench/results/grounding_cost.json]

Two settings, both measured in this run; the baseline of each is its own sampling stage:
- long: a tiny random Qwen2-Audio samples 8 traces of up to 512 tokens for each of 64 items, and
  the ground stage scores every trace (grounding.score_traces=all, no pre-filter: the worst case
  for scoring; a random model's traces would fail every rule check and leave nothing to score).
- demo: round 1 of the CPU demo (configs/demo_cpu.yaml, 256 items, 8 traces of up to 64 tokens)
  after the real cold start; the ground stage scores the traces that pass the rule checks.
Both use the default grounding settings: direct-answer probes (2 per input) with the real audio,
silence, noise and another item's audio, and scoring against another item's audio (a second
teacher-forced pass beside the real audio's). The engine-start count proves grounding opened no
engine of its own.

On a CPU the share is far above the 25% target (README, "Acoustic grounding"): a teacher-forced
pass over a trace costs about 40% of sampling it, since prefill is only about 2.5 times faster
per token than batched decode for a tiny model, and short traces make the fixed cost of each
probe request dominate.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from distill.rollout import engine as engine_module

STARTS = {"count": 0}
_open_engine = engine_module.open_engine


def counting_open_engine(*args, **kwargs):
    """vLLM's engine start, counted (the loop must start one engine per round, not one per stage)."""
    STARTS["count"] += 1
    return _open_engine(*args, **kwargs)


def measure(cfg, data, model: Path, rd, engines) -> dict:
    """Time the sample and ground stages of round `rd` on one warm engine."""
    from distill.grounding.stage import ground_stage
    from distill.rollout.sample import read_samples, sample_stage

    engines.get(model)  # started (and warmed up by the export gate, in the loop) before sampling
    starts = STARTS["count"]
    t0 = time.time()
    sample_stats = sample_stage(cfg, data.train, model, rd, engines.get)
    sample_s = time.time() - t0
    t0 = time.time()
    ground = ground_stage(cfg, data.train, model, rd, engines.get)
    ground_s = time.time() - t0
    traces = sample_stats["new_traces"]
    return {
        "items": len(data.train), "traces": traces,
        "sampled_tokens": sum(t["num_tokens"] for t in read_samples(rd, cfg.sample.num_shards)),
        "traces_scored": ground["traces_scored"],
        "sample_seconds": round(sample_s, 2), "ground_seconds": round(ground_s, 2),
        "probe_seconds": ground["probe_seconds"], "score_seconds": ground["score_seconds"],
        "ground_share_of_sampling": round(ground_s / sample_s, 4),
        "engine_starts_during_sample_and_ground": STARTS["count"] - starts,
        "grounding_gap": ground["grounding_gap"],
    }


def long_traces(out: Path) -> dict:
    from distill.config import load_config
    from distill.loop import init_run_dir
    from distill.rollout.engine import EngineCache
    from distill.rundir import RunDir

    cfg = load_config("configs/demo_cpu.yaml", [
        f"output_dir={out}", "run_name=long", "data.synthetic.train_items=64", "sample.max_tokens=512",
        "sample.num_shards=1", "grounding.score_traces=all", "engine.max_model_len=2048", "train.max_seq_len=2048",
        "cold_start.train.max_seq_len=2048"])
    run = RunDir(cfg.run_dir)
    data = init_run_dir(cfg, run)
    with EngineCache(cfg.engine, cfg.seed) as engines:
        engines.get(cfg.model.path)
        return measure(cfg, data, Path(cfg.model.path), run.round(1), engines)


def demo_round(out: Path) -> dict:
    from distill.config import load_config
    from distill.loop import init_run_dir, run_stage
    from distill.rollout.engine import EngineCache
    from distill.rundir import RunDir

    cfg = load_config("configs/demo_cpu.yaml", [f"output_dir={out}"])
    run = RunDir(cfg.run_dir)
    data = init_run_dir(cfg, run)
    with EngineCache(cfg.engine, cfg.seed) as engines:
        for stage in run.round(0).stages:  # the cold start; its export gate and eval open the engine
            run_stage(cfg, run, 0, stage, data, engines)
        return measure(cfg, data, run.round(0).model_dir, run.round(1), engines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", default="bench/results/grounding_cost.json")
    args = ap.parse_args()
    engine_module.open_engine = counting_open_engine
    with tempfile.TemporaryDirectory() as tmp:
        results = {"long": long_traces(Path(tmp)), "demo": demo_round(Path(tmp))}
    result = {"bench": "grounding_cost", "machine": platform.processor() or platform.machine(),
              "cpus": os.cpu_count(), "target_share": 0.25, **results}
    Path(args.out).write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
