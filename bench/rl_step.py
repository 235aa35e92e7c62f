"""Benchmark: where an RL step's time goes, and its rollout and training sides against their plain
counterparts on the same prompts and traces.

    .venv/bin/python bench/rl_step.py [--work DIR] [--steps 10] [--out bench/results/rl_step.json]

Set-up: configs/demo_rl_cpu.yaml run to round 1's SFT student (round 0, then sample, ground, filter,
train; bench/rl_demo.py's --work is reused when it holds one), then its rl stage for `--steps`
steps: 2 DeepSpeed ZeRO-2 ranks on gloo, each with its vLLM engine beside it on half the cores.
From the stage's rl/log.jsonl, per step:
- rollout: tokens sampled over both ranks / the slower rank's sampling seconds (G samples per prompt,
  with log-probabilities and the audio-token ban), against raw vLLM: two processes, one per rank, each
  a plain `vllm.LLM` on half the cores with the same engine settings, sampling the very prompts that
  rank sampled at each step (rl/prompts.py step_prompts; the same seeds, n, temperature, top_p, cap)
  from the start policy, with no log-probabilities, ban or weight sync; tokens / the slower process's
  generate seconds;
- weight sync: seconds to push the trainer's weights into the engine and drop its caches;
- training: positions fed to the model per second of the update (prompt and response tokens over
  both ranks), against distill's SFT trainer (`accelerate launch distill/train.py`, the same 2 ranks,
  ZeRO stage and micro batch) on the same traces as SFT rows for one epoch (its train_summary.json
  tokens / seconds);
- the share of the step's wall time each part takes (rollout, grounding reward scoring, update, sync,
  and the rest: rewards, metrics, the gather across ranks, writing the rollouts). Each part is the
  slower rank's time, so the parts can add up to a little more than the step (a negative rest).
The first step is left out of the means (engine warm-up, the first DeepSpeed step).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.rl_demo import cpu_name, distill, from_sft
from distill.config import load_config, to_yaml
from distill.core.files import read_json, read_jsonl
from distill.training.launch import train_command, train_env

WORLD = 2


def prepare(work: Path, steps: int) -> Path:
    """The run after its rl stage of `steps` steps (round 1), from bench/rl_demo.py's kept SFT state."""
    run = from_sft(work, [f"rl.steps={steps}", f"rl.save_every={steps}"])
    distill("stage", "rl", "--round", "1", str(run / "config.yaml"), log=work / "distill.log")
    return run


def raw_vllm_worker(run: Path, rank: int, out: Path) -> None:
    """One rank's share of every step's prompts on a plain vLLM engine (the baseline)."""
    import torch
    from vllm import LLM, SamplingParams

    from data_pipelines.items import read_manifest
    from distill.data import audio_cache
    from distill.models.registry import family_of
    from distill.models.tokens import load_tokenizer
    from distill.rl.prompts import step_prompts
    from distill.rl.rollout import rl_seed
    from distill.rollout.engine import engine_dtype, engine_prompt, item_request

    cfg = load_config(run / "config.yaml")
    r, e = cfg.rl, cfg.engine
    start = run / "round_001" / "rl" / "start"
    family_of(start)
    torch.set_num_threads(max(1, (os.cpu_count() or 1) // WORLD))
    os.environ["VLLM_ENABLE_V1_MULTIPROCESSING"] = "0"  # in this process, as the RL ranks run theirs
    llm = LLM(
        model=str(start),
        max_model_len=e.max_model_len,
        kv_cache_memory_bytes=e.kv_cache_memory_bytes,
        dtype=engine_dtype(e.dtype, False),
        enforce_eager=e.enforce_eager,
        enable_chunked_prefill=e.enable_chunked_prefill,
        enable_prefix_caching=e.enable_prefix_caching,
        block_size=e.block_size,
        max_num_batched_tokens=e.max_num_batched_tokens,
        limit_mm_per_prompt={"audio": 1},
        seed=cfg.seed + rank,
    )
    band = {it.id: it for it in read_manifest(run / "data" / "train.jsonl")}
    items = sorted(i["id"] for i in read_json(run / "round_001" / "rl" / "band.json")["items"])
    tokenizer, cache = load_tokenizer(str(start)), audio_cache(cfg)
    steps = len(list(read_jsonl(run / "round_001" / "rl" / "log.jsonl")))
    per_step = []
    for step in range(steps):
        mine = step_prompts(items, step, r.prompts_per_step, f"{cfg.seed}:1")[rank::WORLD]
        requests = [item_request(cfg, tokenizer, band[i], cache, rl_seed(cfg.seed, 1, i, step)) for i in mine]
        params = [
            SamplingParams(
                n=r.group_size,
                temperature=r.temperature,
                top_p=r.top_p,
                max_tokens=r.max_response_tokens,
                seed=q.seed,
            )
            for q in requests
        ]
        t0 = time.perf_counter()
        outs = llm.generate(
            [engine_prompt(q.prompt, q.audio, q.sample_rate) for q in requests], params, use_tqdm=False
        )
        seconds = time.perf_counter() - t0
        per_step.append(
            {"tokens": sum(len(o.token_ids) for out in outs for o in out.outputs), "seconds": seconds}
        )
    out.write_text(json.dumps(per_step))


def raw_vllm(run: Path, work: Path) -> list[dict]:
    """Both baseline ranks at once (as the RL ranks sample); per step: tokens, the slower's seconds."""
    env = {
        **os.environ,
        "OMP_NUM_THREADS": str(max(1, (os.cpu_count() or 1) // WORLD)),
        "CUDA_VISIBLE_DEVICES": "",
    }
    outs = [work / f"raw_vllm_rank{r}.json" for r in range(WORLD)]
    procs = [
        subprocess.Popen(
            [sys.executable, __file__, "--raw-vllm-worker", str(run), str(r), str(outs[r])],
            env=env,
            stdout=subprocess.DEVNULL,
            stderr=(work / f"raw_vllm_rank{r}.log").open("w"),
        )
        for r in range(WORLD)
    ]
    for p in procs:
        if p.wait():
            raise RuntimeError(f"the raw vLLM baseline failed; see {work}/raw_vllm_rank*.log")
    ranks = [json.loads(o.read_text()) for o in outs]
    return [
        {"tokens": sum(r[i]["tokens"] for r in ranks), "seconds": max(r[i]["seconds"] for r in ranks)}
        for i in range(len(ranks[0]))
    ]


def sft_rows(run: Path, out: Path) -> Path:
    """The RL stage's rollouts as SFT rows (prompt, audio, completion): what the SFT trainer trains on."""
    from data_pipelines.items import read_manifest
    from distill.data import audio_cache
    from distill.models.tokens import load_tokenizer
    from distill.rollout.engine import item_request

    cfg = load_config(run / "config.yaml")
    items = {it.id: it for it in read_manifest(run / "data" / "train.jsonl")}
    start = run / "round_001" / "rl" / "start"
    tokenizer, cache = load_tokenizer(str(start)), audio_cache(cfg)
    rows = []
    for f in sorted((run / "round_001" / "rl" / "rollouts").glob("step-*.jsonl")):
        for t in read_jsonl(f):
            it = items[t["item_id"]]
            prompt = item_request(cfg, tokenizer, it, cache).prompt.removesuffix(cfg.sample.generation_prefix)
            rows.append(
                {
                    "id": t["trace_id"],
                    "audio": it.audio,
                    "audio_sha256": it.audio_sha256,
                    "prompt": prompt,
                    "completion": t["completion"],
                }
            )
    out.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return out


def sft_trainer(run: Path, work: Path) -> dict:
    """distill's SFT trainer on the rollouts, with the RL stage's ranks, ZeRO stage and micro batch."""
    cfg = load_config(run / "config.yaml")
    rows = sft_rows(run, work / "rollouts_as_sft.jsonl")
    config = work / "sft_config.yaml"
    overrides = [
        f"train.micro_batch_size={cfg.rl.micro_batch_size}",
        "train.grad_accum=1",
        "train.epochs=1",
        "train.max_steps=0",
        "train.save_steps=0",
    ]
    config.write_text(to_yaml(load_config(run / "config.yaml", overrides)))
    out = work / "sft_out"
    shutil.rmtree(out, ignore_errors=True)
    tcfg = load_config(config).train
    cmd = train_command(tcfg, config, [rows], run / "round_001" / "rl" / "start", out, "train")
    with (work / "sft.log").open("w") as log:
        if subprocess.run(cmd, env=train_env(tcfg), stdout=log, stderr=subprocess.STDOUT).returncode:
            raise RuntimeError(f"the SFT trainer failed; see {work}/sft.log")
    return read_json(out / "final" / "train_summary.json")


def mean(values: list[float]) -> float:
    return sum(values) / len(values) if values else 0.0


def main() -> None:
    if len(sys.argv) == 5 and sys.argv[1] == "--raw-vllm-worker":
        raw_vllm_worker(Path(sys.argv[2]), int(sys.argv[3]), Path(sys.argv[4]))
        return
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--work", default="/tmp/distill_rl_demo")
    p.add_argument("--steps", type=int, default=10)
    p.add_argument("--out", default="bench/results/rl_step.json")
    args = p.parse_args()
    work = Path(args.work)
    run = prepare(work, args.steps)
    lines = list(read_jsonl(run / "round_001" / "rl" / "log.jsonl"))
    raw = raw_vllm(run, work)
    sft = sft_trainer(run, work)
    steps = lines[1:]  # the first step warms the engines and DeepSpeed up
    wall = [b["elapsed_s"] - a["elapsed_s"] for a, b in zip(lines, lines[1:], strict=False)]
    parts = {k: mean([s[k] for s in steps]) for k in ("rollout_s", "grounding_s", "train_s", "sync_s")}
    step_s = mean(wall)
    rollout_tps = sum(s["sampled_tokens"] for s in steps) / sum(s["rollout_s"] for s in steps)
    raw_tps = sum(r["tokens"] for r in raw[1:]) / sum(r["seconds"] for r in raw[1:])
    train_tps = sum(s["train_tokens"] for s in steps) / sum(s["train_s"] for s in steps)
    result = {
        "machine": cpu_name(),
        "cores": os.cpu_count(),
        "steps_measured": len(steps),
        "step_seconds": round(step_s, 3),
        "share": {k.removesuffix("_s"): round(v / step_s, 3) for k, v in parts.items()}
        | {"other": round(1 - sum(parts.values()) / step_s, 3)},
        "seconds": {k: round(v, 3) for k, v in parts.items()},
        "rollout_tokens_per_s": round(rollout_tps, 1),
        "raw_vllm_tokens_per_s": round(raw_tps, 1),
        "rollout_vs_raw_vllm": round(rollout_tps / raw_tps, 3),
        "weight_sync_s": round(parts["sync_s"], 4),
        "train_tokens_per_s": round(train_tps, 1),
        "sft_trainer_tokens_per_s": sft["tokens_per_s"],
        "train_vs_sft": round(train_tps / sft["tokens_per_s"], 3),
    }
    print(json.dumps(result, indent=2))
    Path(args.out).write_text(json.dumps(result, indent=2) + "\n")


if __name__ == "__main__":
    main()
