"""Benchmark: the ground stage's time as a share of the sample stage's, on the same items, with the
same vLLM engine (opened once, reused from sampling to grounding, as the loop does).

    .venv/bin/python bench/grounding_cost.py [--out bench/results/grounding_cost.json]

Two settings:
- long: the demo's tiny random model samples 8 traces of up to 512 tokens for each of 64 items. A
  random model's traces fail every rule check, so here the rules are off (filter.checks=[]): every
  trace passes, as if a trained model wrote it, and every item has traces to keep (the most a
  round can probe and score with keep_per_prompt=4 of 8 and the default pass-rate band).
- demo: round 1 of the CPU demo (configs/demo_cpu.yaml, 256 items, 8 traces of up to 64 tokens)
  after the real cold start.
Each setting samples the same items with the same seeds on one warm engine, each variant into its
own run directory, and grounds them; two passes over the variants in turn (a slow spell of the
machine falls on all of them), the faster sampling and the faster grounding of each counting
(times vary by a tenth from run to run here):
- distill: the defaults: the real audio's log-probabilities returned by sampling
  (grounding.real_logprobs=sampled), so the ground stage scores only the counterfactual; only the
  traces the filter can keep are scored (grounding.score_traces=keepable) and only the items with
  such a trace probed (grounding.probe_items=keepable), their probes held to the item's options
  (grounding.probe_answers=options);
- scored: grounding.real_logprobs=scored, plain sampling and a teacher-forced pass for the real
  audio too. Its sampling time is the reference of every share: a variant that samples with
  log-probabilities is charged what that adds, (ground + sampling with log-probabilities - plain
  sampling) / plain sampling, with the fastest sampling with them of all such variants (they
  sample alike), never credited when it was faster than plain;
- free: probes that answer free text of up to 16 tokens (grounding.probe_answers=free), what
  they did before 2 December 2026;
- no_prefix_reuse: counterfactual scorings that do not read the prefix cache
  (grounding.reuse_prefix_cache=false), what they did before 3 December 2026 (the demo config's
  engine.block_size=32 makes an item's prompt share blocks);
- baseline: the defaults with every passing trace scored and every item probed
  (score_traces=passing, probe_items=all), what the ground stage did before it asked the
  filter's selection.
Then the defaults' scoring is timed with and without reading the prefix cache in turn, on one
round's traces (prefix_reuse_ab), since the gain is smaller than the machine's drift between
variants. Before each variant samples, the engine's caches of prepared audio (features, encoder outputs)
and of prompt prefixes are emptied, so every variant samples as the loop does, before the engine
has seen the train items' audio (without that, later variants sampled up to 37% faster). All use
direct-answer probes (2 per input) with the real audio, silence, noise and another item's audio,
and score against another item's audio. The engine-start count proves grounding opened no engine.
The engine runs as the loop runs it (engine.process=auto: inside this process on a CPU).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import sys
import tempfile
import time
from dataclasses import replace
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from distill.rollout import engine as engine_module

STARTS = {"count": 0}
_open_engine = engine_module.open_engine


def counting_open_engine(*args, **kwargs):
    """vLLM's engine start, counted (the loop must start one engine per round, not one per stage)."""
    STARTS["count"] += 1
    return _open_engine(*args, **kwargs)


def timed(stage, *args):
    t0 = time.time()
    out = stage(*args)
    return out, round(time.time() - t0, 2)


VARIANTS = {
    "distill": {},
    "scored": {"real_logprobs": "scored"},
    "free": {"probe_answers": "free"},
    "no_prefix_reuse": {"reuse_prefix_cache": False},
    "baseline": {"score_traces": "passing", "probe_items": "all"},
}
REPEATS = 2


def measure(cfg, data, model: Path, runs: dict, engines, variants: dict) -> dict:
    """Time the sample and ground stages of each variant (module docstring) on one warm engine,
    each on round 1 of its own run directory: REPEATS passes over the variants in turn (so a slow
    spell of the machine falls on every variant, not on one), the fastest time of each stage counting."""
    from distill.core.rows import read_samples
    from distill.grounding.stage import ground_stage
    from distill.rollout.sample import sample_stage

    engines.get(model)  # started (and warmed up by the export gate, in the loop) before sampling
    starts = STARTS["count"]
    runs_s: dict[str, dict[str, list]] = {name: {"sample": [], "ground": []} for name in variants}
    grounds, completions = {}, {}
    for _ in range(REPEATS):
        for name, overrides in variants.items():
            vcfg = replace(cfg, grounding=replace(cfg.grounding, **overrides))
            rd = runs[name].round(1)
            shutil.rmtree(rd.samples_dir, ignore_errors=True)
            shutil.rmtree(rd.grounding_dir, ignore_errors=True)
            cold_caches(engines.get(model))
            runs_s[name]["sample"].append(timed(sample_stage, vcfg, data.train, model, rd, engines.get)[1])
            ground, ground_s = timed(ground_stage, vcfg, data.train, model, rd, engines.get)
            if ground_s <= min(runs_s[name]["ground"], default=ground_s):
                grounds[name] = ground
            runs_s[name]["ground"].append(ground_s)
            completions[name] = [t["completion"] for t in read_samples(rd, cfg.sample.num_shards)]
    out = {}
    for name, ground in grounds.items():
        out[name] = {
            "sample_seconds": min(runs_s[name]["sample"]),
            "sample_runs_seconds": runs_s[name]["sample"],
            "ground_seconds": min(runs_s[name]["ground"]),
            "ground_runs_seconds": runs_s[name]["ground"],
            "probe_seconds": ground["probe_seconds"],
            "score_seconds": ground["score_seconds"],
            "items_probed": ground["items_probed"],
            "traces_scored": ground["traces_scored"],
            "traces_real_from_sampling": ground["traces_real_from_sampling"],
            "traces_passed_over": ground["traces_passed_over"],
            "grounding_gap": ground["grounding_gap"],
            "prefix_tokens_reused": ground["prefix_tokens_reused"],
            "prefix_heads_filled": ground["prefix_heads_filled"],
            "prefix_rescored": ground["prefix_rescored"],
        }
    # Variants that sample alike are charged alike: the fastest sampling with log-probabilities
    # over plain sampling (noise in one variant's sampling is not charged to it alone).
    plain = out["scored"]["sample_seconds"]
    with_logprobs = [
        n for n, o in variants.items() if o.get("real_logprobs", cfg.grounding.real_logprobs) == "sampled"
    ]
    extra = max(0.0, min((out[n]["sample_seconds"] for n in with_logprobs), default=plain) - plain)
    for name, v in out.items():
        charged = v["ground_seconds"] + (extra if name in with_logprobs else 0.0)
        v["ground_share_of_sampling"] = round(charged / plain, 4)
        v["sampling_over_plain"] = round(v["sample_seconds"] / plain - 1, 4)
    traces = read_samples(runs["distill"].round(1), cfg.sample.num_shards)
    return {
        "items": len(data.train),
        "traces": len(traces),
        "sampled_tokens": sum(t["num_tokens"] for t in traces),
        "same_traces_every_variant": len({tuple(c) for c in completions.values()}) == 1,
        **out,
        **(
            {
                "speedup_vs_baseline": round(
                    out["baseline"]["ground_seconds"] / out["distill"]["ground_seconds"], 2
                )
            }
            if "baseline" in out
            else {}
        ),
        **(
            {
                "probe_speedup_vs_free": round(
                    out["free"]["probe_seconds"] / out["distill"]["probe_seconds"], 2
                )
            }
            if "free" in out
            else {}
        ),
        **(
            {
                "score_speedup_vs_no_prefix_reuse": round(
                    out["no_prefix_reuse"]["score_seconds"] / out["distill"]["score_seconds"], 2
                )
            }
            if "no_prefix_reuse" in out
            else {}
        ),
        "prefix_reuse_ab": prefix_reuse_ab(cfg, data, model, runs["distill"].round(1), engines.get),
        "engine_starts_during_sample_and_ground": STARTS["count"] - starts,
    }


AB_REPEATS = 3


def prefix_reuse_ab(cfg, data, model: Path, rd, get_engine) -> dict:
    """Scoring with and without reading the prefix cache (grounding.reuse_prefix_cache), in turn
    AB_REPEATS times on the traces of `rd`, the ground stage run whole each time: the variants'
    scorings above are minutes apart, and the machine's speed drifts more than the gain."""
    from distill.grounding.stage import ground_stage

    runs: dict[str, list] = {"reuse": [], "no_reuse": []}
    counts = {}
    for _ in range(AB_REPEATS):
        for name, seconds in runs.items():
            vcfg = replace(cfg, grounding=replace(cfg.grounding, reuse_prefix_cache=name == "reuse"))
            shutil.rmtree(rd.grounding_dir, ignore_errors=True)
            ground = ground_stage(vcfg, data.train, model, rd, get_engine)
            seconds.append(ground["score_seconds"])
            counts[name] = {
                k: ground[k] for k in ("prefix_tokens_reused", "prefix_heads_filled", "prefix_rescored")
            }
    median = {name: sorted(v)[len(v) // 2] for name, v in runs.items()}
    return {
        "score_runs_seconds": runs,
        "score_median_seconds": median,
        **counts["reuse"],
        "score_speedup": round(median["no_reuse"] / median["reuse"], 3),
    }


def cold_caches(llm) -> None:
    """Empty what vLLM kept from earlier requests: processed audio features, encoder outputs, prompt
    prefixes (the loop's round opens an engine that holds none of the round's audio)."""
    llm.reset_mm_cache()
    llm.llm_engine.reset_encoder_cache()
    llm.reset_prefix_cache()


def warm_up(cfg, data, llm) -> None:
    """What the loop's export gate does to the engine before sampling: one teacher-forced scoring,
    which compiles vLLM's log-probability kernels (seconds, once per engine process)."""
    from distill.core.prompts import item_prompt
    from distill.data import audio_cache
    from distill.grounding.scoring import ScoreJob, score
    from distill.models.tokens import load_tokenizer

    tokenizer = load_tokenizer(cfg.model.path)
    item = data.train[0]
    audio = audio_cache(cfg).chunks(item.audio, item.audio_sha256)
    score(
        llm,
        tokenizer,
        [ScoreJob(item_prompt(tokenizer, item, cfg.data.system_prompt, len(audio)), item.answer, audio)],
        cfg.data.sample_rate,
    )


def run_dirs(cfg) -> tuple:
    """The data and one run directory per variant (the same data in each)."""
    from distill.core.rundir import RunDir
    from distill.loop import init_run_dir

    dirs = {}
    for name in VARIANTS:
        vcfg = replace(cfg, run_name=f"{cfg.run_name}_{name}")
        dirs[name] = RunDir(vcfg.run_dir)
        data = init_run_dir(vcfg, dirs[name])
    return data, dirs


def long_traces(out: Path) -> dict:
    from distill.config import load_config
    from distill.rollout.engine import EngineCache

    cfg = load_config(
        "configs/demo_cpu.yaml",
        [
            f"output_dir={out}",
            "run_name=long",
            "data.synthetic.train_items=64",
            "sample.max_tokens=512",
            "sample.num_shards=1",
            "filter.checks=[]",
            "engine.max_model_len=2048",
            "train.max_seq_len=2048",
            "cold_start.train.max_seq_len=2048",
        ],
    )
    data, dirs = run_dirs(cfg)
    with EngineCache(cfg.engine, cfg.seed) as engines:
        warm_up(cfg, data, engines.get(cfg.model.path))
        return measure(cfg, data, Path(cfg.model.path), dirs, engines, VARIANTS)


def demo_round(out: Path) -> dict:
    from distill.config import load_config
    from distill.loop import run_stage
    from distill.rollout.engine import EngineCache

    cfg = load_config("configs/demo_cpu.yaml", [f"output_dir={out}"])
    data, dirs = run_dirs(cfg)
    run = dirs["distill"]
    with EngineCache(cfg.engine, cfg.seed) as engines:
        for stage in run.round(0).stages:  # the cold start; its export gate and eval open the engine
            run_stage(replace(cfg, run_name=f"{cfg.run_name}_distill"), run, 0, stage, data, engines)
        return measure(cfg, data, run.round(0).model_dir, dirs, engines, VARIANTS)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", default="bench/results/grounding_cost.json")
    args = ap.parse_args()
    engine_module.open_engine = counting_open_engine
    with tempfile.TemporaryDirectory() as tmp:
        results = {"long": long_traces(Path(tmp)), "demo": demo_round(Path(tmp))}
    result = {
        "bench": "grounding_cost",
        "machine": platform.processor() or platform.machine(),
        "cpus": os.cpu_count(),
        "target_share": 0.25,
        **results,
    }
    Path(args.out).write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
