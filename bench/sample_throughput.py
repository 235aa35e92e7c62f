"""Benchmark: the sample stage's output tokens/s against raw vLLM on the same prompts, audio and engine.

    .venv/bin/python bench/sample_throughput.py [--out bench/results/sample_throughput.json]
                                                [--settings demo,long,server] [--profile]

Settings:
- demo: round 1 of the CPU demo (configs/demo_cpu.yaml: 256 items x 8 samples of up to 64 tokens)
  from the model its real cold start trained (round 0's export), as the loop samples it;
- long: the demo's tiny random base model, 64 items x 8 samples of up to 512 tokens (a random
  model rarely stops early, so about 2,600 tokens per item's samples);
- server: the long setting with sample.backend=server, from a vLLM server on the same model
  (`vllm.entrypoints.openai.api_server`, as tests/serving.py starts it). Its baseline is the server
  on its own: every item's request (the stage's very bodies and seeds) sent at once from a thread
  pool, the most this server delivers for the work; tokens are the server's own count
  (/metrics), its prefix, audio and encoder caches emptied before each side.
Raw vLLM: `LLM.generate(prompts, SamplingParams(n=8, ...))`, one request per item, with the prompts
and audio prepared beforehand and no log-probabilities. distill: the sample stage into a fresh round
directory, as the loop runs it: reading the audio through the cache, asking for the log-probabilities
the ground stage reuses, writing the shard. Both on one warm engine, its caches (processed audio,
encoder outputs, prompt prefixes) emptied before each side, the order rotated, two passes each;
the faster pass of each side counts. The demo's config samples 4 shards (one engine run feeds them
all, writing each as it finishes, so that a killed stage keeps the shards done); "distill_one_shard"
samples the same items as one shard, which shows what the shards cost. `--profile` writes the
sample stage's cProfile (top 30 by cumulative time) beside the results.
"""

from __future__ import annotations

import argparse
import cProfile
import io
import json
import os
import platform
import pstats
import shutil
import sys
import tempfile
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import replace
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from grounding_cost import cold_caches  # the bench folder is not a package
from server_client import generation_tokens, start_server

REPEATS = 2


def raw_side(cfg, items, model: Path, llm) -> tuple[float, int]:
    """Seconds and output tokens of plain `LLM.generate` with n samples per item."""
    from vllm import SamplingParams

    from distill.core.seeds import sample_seed
    from distill.data import audio_cache
    from distill.models.tokens import load_tokenizer
    from distill.rollout.engine import engine_prompt, item_request

    tokenizer, cache, scfg = load_tokenizer(str(model)), audio_cache(cfg), cfg.sample
    requests = [item_request(cfg, tokenizer, it, cache) for it in items]
    prompts = [engine_prompt(r.prompt, r.audio, r.sample_rate) for r in requests]
    params = [
        SamplingParams(
            n=scfg.n,
            temperature=scfg.temperature,
            top_p=scfg.top_p,
            max_tokens=scfg.max_tokens,
            seed=sample_seed(cfg.seed, 1, it.id, 0),
        )
        for it in items
    ]
    cold_caches(llm)
    t0 = time.perf_counter()
    outs = llm.generate(prompts, params, use_tqdm=False)
    seconds = time.perf_counter() - t0
    return seconds, sum(len(c.token_ids) for o in outs for c in o.outputs)


def distill_side(cfg, items, model: Path, llm, rd, profile: Path | None) -> tuple[float, int]:
    """Seconds and output tokens of the sample stage writing round `rd`'s shard."""
    from distill.core.rows import read_samples
    from distill.rollout.sample import sample_stage

    shutil.rmtree(rd.samples_dir, ignore_errors=True)
    cold_caches(llm)
    profiler = cProfile.Profile() if profile else None
    t0 = time.perf_counter()
    if profiler:
        profiler.enable()
    sample_stage(cfg, items, model, rd, lambda _: llm)
    if profiler:
        profiler.disable()
    seconds = time.perf_counter() - t0
    if profiler:
        text = io.StringIO()
        pstats.Stats(profiler, stream=text).sort_stats("cumulative").print_stats(30)
        profile.write_text(text.getvalue())
    return seconds, sum(t["num_tokens"] for t in read_samples(rd, cfg.sample.num_shards))


def measure(cfg, items, model: Path, llm, run, profile: Path | None) -> dict:
    """Each side REPEATS times, the order rotating; the faster pass of each counts. Besides the
    config's shards (each its own engine call), "distill_one_shard" samples the same items as one
    shard: the stage's cost apart from the shards' separate batches."""
    one = replace(cfg, sample=replace(cfg.sample, num_shards=1))
    sides = {
        "raw": lambda first: raw_side(cfg, items, model, llm),
        "distill": lambda first: distill_side(
            cfg, items, model, llm, run.round(1), profile if first else None
        ),
        "distill_one_shard": lambda first: distill_side(one, items, model, llm, run.round(2), None),
    }
    return summary(cfg, len(items), rotate(sides))


def rotate(sides: dict[str, Callable[[bool], tuple[float, int]]]) -> dict[str, list[tuple[float, int]]]:
    """(seconds, tokens) of each side (called with whether it is the first pass), REPEATS passes,
    the order rotating between passes."""
    runs: dict[str, list[tuple[float, int]]] = {side: [] for side in sides}
    names = list(sides)
    for i in range(REPEATS):
        for side in names[i % len(names) :] + names[: i % len(names)]:
            runs[side].append(sides[side](i == 0))
    return runs


def summary(cfg, items: int, runs: dict[str, list[tuple[float, int]]]) -> dict:
    """The faster pass of each side, and distill's tokens/s over raw vLLM's."""
    best = {side: min(r, key=lambda x: x[0]) for side, r in runs.items()}
    rates = {side: tokens / seconds for side, (seconds, tokens) in best.items()}
    return {
        "items": items,
        "samples_per_item": cfg.sample.n,
        "max_tokens": cfg.sample.max_tokens,
        **{f"{side}_runs": [{"seconds": round(s, 2), "tokens": t} for s, t in r] for side, r in runs.items()},
        "shards": cfg.sample.num_shards,
        **{f"{side}_tokens_per_s": round(rate, 1) for side, rate in rates.items()},
        "ratio": round(rates["distill"] / rates["raw"], 3),
        "ratio_one_shard": round(rates["distill_one_shard"] / rates["raw"], 3),
    }


def demo(out: Path, profile: Path | None) -> dict:
    """Round 1 of the demo from the model its cold start trained."""
    from distill.config import load_config
    from distill.core.rundir import RunDir
    from distill.loop import init_run_dir, run_stage
    from distill.rollout.engine import EngineCache

    cfg = load_config("configs/demo_cpu.yaml", [f"output_dir={out}", "run_name=demo"])
    run = RunDir(cfg.run_dir)
    data = init_run_dir(cfg, run)
    with EngineCache(cfg.engine, cfg.seed) as engines:
        for stage in run.round(0).stages:  # the cold start; its export gate opens the engine
            run_stage(cfg, run, 0, stage, data, engines)
        model = run.round(0).model_dir
        return measure(cfg, data.train, model, engines.get(model), run, profile)


# The long setting: the random base model, 64 items x 8 samples of up to 512 tokens.
LONG = [
    "data.synthetic.train_items=64",
    "sample.max_tokens=512",
    "engine.max_model_len=2048",
    "train.max_seq_len=2048",
    "cold_start.train.max_seq_len=2048",
]


def long(out: Path, profile: Path | None) -> dict:
    """The random base model's long traces."""
    from distill.config import load_config
    from distill.core.rundir import RunDir
    from distill.loop import init_run_dir
    from distill.rollout.engine import EngineCache

    cfg = load_config("configs/demo_cpu.yaml", [f"output_dir={out}", "run_name=long", *LONG])
    run = RunDir(cfg.run_dir)
    data = init_run_dir(cfg, run)
    model = Path(cfg.model.path)
    with EngineCache(cfg.engine, cfg.seed) as engines:
        llm = engines.get(model)
        raw_side(cfg, data.train[:4], model, llm)  # compiles and warms the engine for both sides
        return measure(cfg, data.train, model, llm, run, profile)


def server(out: Path, profile: Path | None) -> dict:
    """The long setting from a vLLM server (sample.backend=server): the sample stage against every
    item's request sent at once (the most this server delivers for the work), on the same server,
    its caches emptied before each side; tokens as the server counts them. The plain client is
    also timed at the stage's concurrency (sample.server.concurrency requests in flight)."""
    import httpx

    from distill.config import load_config
    from distill.core.rundir import RunDir
    from distill.export.model_card import serve_args
    from distill.loop import init_run_dir
    from distill.openai_client import ChatClient
    from distill.training.launch import free_port

    port = free_port()
    base_url = f"http://127.0.0.1:{port}/v1"
    cfg = load_config(
        "configs/demo_cpu.yaml",
        [
            f"output_dir={out}",
            "run_name=server",
            *LONG,
            "sample.backend=server",
            f"sample.server.base_url={base_url}",
            "grounding.enabled=false",  # grounding needs the model in an offline engine
        ],
    )
    run = RunDir(cfg.run_dir)
    data = init_run_dir(cfg, run)
    model = Path(cfg.model.path)
    os.environ["VLLM_SERVER_DEV_MODE"] = "1"  # the cache-reset endpoints
    # The offline engine's batch size and dtype, as the serve command distill prints gives them.
    args = serve_args(cfg, model, 1)
    extra = tuple(args[args.index("--max-num-batched-tokens") :])
    proc = start_server(model, port, out / "server.log", cfg.engine.max_model_len, extra)
    client = ChatClient(cfg.sample.server)

    def cold() -> None:
        for cache in ("prefix", "mm", "encoder"):
            httpx.post(f"http://127.0.0.1:{port}/reset_{cache}_cache", timeout=60).raise_for_status()

    def served(side: Callable[[], None]) -> tuple[float, int]:
        cold()
        before = generation_tokens(base_url)
        t0 = time.perf_counter()
        side()
        seconds = time.perf_counter() - t0
        return seconds, int(generation_tokens(base_url) - before)

    def raw(concurrency: int | None) -> Callable[[], None]:
        def side() -> None:
            bodies = server_bodies(cfg, data.train)
            with ThreadPoolExecutor(max_workers=concurrency or len(bodies)) as pool:
                replies = list(pool.map(client.chat, bodies))
            assert all(r.body is not None for r in replies), [
                (r.reason, r.text[:300]) for r in replies if r.body is None
            ][:2]

        return side

    def stage(config, rd) -> Callable[[], None]:
        def side() -> None:
            shutil.rmtree(rd.samples_dir, ignore_errors=True)
            sample_stage(config, data.train, model, rd, lambda _: None)

        return side

    from distill.rollout.sample import sample_stage

    one = replace(cfg, sample=replace(cfg.sample, num_shards=1))
    try:
        served(lambda: client.chat(server_bodies(cfg, data.train[:4])[0]))  # warms the server
        sides = {
            "raw": raw(None),
            # The plain client at the stage's concurrency: what the client costs apart from how
            # many requests it keeps in flight.
            "raw_same_concurrency": raw(cfg.sample.server.concurrency),
            "distill": stage(cfg, run.round(1)),
            "distill_one_shard": stage(one, run.round(2)),
        }
        runs = rotate({name: lambda _, f=f: served(f) for name, f in sides.items()})
        result = summary(cfg, len(data.train), runs)
        seconds, tokens = min(runs["raw_same_concurrency"])
        result["ratio_same_concurrency"] = round(result["distill_tokens_per_s"] * seconds / tokens, 3)
        return {"concurrency": cfg.sample.server.concurrency, **result}
    finally:
        client.close()
        proc.terminate()
        proc.wait(timeout=60)


def server_bodies(cfg, items) -> list[dict]:
    """The sample stage's request bodies for `items` (server.item_body, the same seeds)."""
    from distill.core.seeds import sample_seed
    from distill.data import audio_cache
    from distill.rollout.server import item_body

    cache = audio_cache(cfg)
    return [
        item_body(cfg, it, cache.chunks(it.audio, it.audio_sha256), sample_seed(cfg.seed, 1, it.id, 0))
        for it in items
    ]


SETTINGS = {"demo": demo, "long": long, "server": server}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", default="bench/results/sample_throughput.json")
    ap.add_argument("--settings", default="demo,long,server", help="comma-separated: demo, long, server")
    ap.add_argument("--profile", action="store_true", help="write the sample stage's cProfile beside --out")
    args = ap.parse_args()
    out = Path(args.out)
    results = {}
    with tempfile.TemporaryDirectory() as tmp:
        for name in args.settings.split(","):
            profile = out.with_name(f"{out.stem}_{name}_profile.txt") if args.profile else None
            results[name] = SETTINGS[name](Path(tmp), profile)
            print(name, json.dumps(results[name]), flush=True)
    # Settings not run this time keep their last results (each setting is its own measurement).
    earlier = json.loads(out.read_text()) if out.exists() else {}
    result = {
        **earlier,
        "bench": "sample_throughput",
        "machine": platform.processor() or platform.machine(),
        "cpus": os.cpu_count(),
        "target_ratio": 0.9,
        **results,
    }
    out.write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
