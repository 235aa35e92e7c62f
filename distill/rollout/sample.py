"""The sample stage: n traces per (audio, question) from the current model, written by shard.

A shard is items[index::count]. Each shard file appears whole (temp name, then rename), so a run
that is interrupted and re-run samples only the shards that are missing, and a Slurm array task
(`SLURM_ARRAY_TASK_ID` / `SLURM_ARRAY_TASK_COUNT`) samples just its own. Every trace carries its
lineage: item, audio hash, round, model weights hash, sampling parameters and its own seed.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import replace
from pathlib import Path

from data_pipelines.items import Item
from distill.config import Config
from distill.core.files import atomic_write_jsonl, read_json, read_jsonl, sha256_file
from distill.core.prompts import reasoning_split
from distill.core.rows import TRACE_SCHEMA_VERSION
from distill.core.rundir import RoundDir
from distill.core.seeds import sample_seed
from distill.core.stages import StageContext, shard_plan
from distill.data import audio_cache
from distill.models.tokens import audio_tokens, load_tokenizer, think_close_token_id
from distill.openai_client import ChatClient
from distill.rollout.engine import Completion, generate, item_request, verified_weights_hash
from distill.rollout.server import partial_path, sample_shard


def logprob_record(out: Completion, think_close_id: int | None) -> dict:
    """The sampled trace's log-probability, split where teacher-forced scoring splits it: the
    reasoning through the last `</think>`, then the answer."""
    cut = reasoning_split(out.token_ids, think_close_id)
    return {"reasoning": sum(out.logprobs[:cut]), "answer": sum(out.logprobs[cut:]), "reasoning_tokens": cut}


def sample_stage(cfg: Config, items: list[Item], model_dir: Path, rd: RoundDir, get_engine: Callable) -> dict:
    """Sample the missing shards of round `rd` from `model_dir`; return counts for the metrics."""
    count, indices = shard_plan(cfg)
    sc = cfg.sample
    solved = solved_before(rd) if sc.skip_solved else set()
    pool = [it for it in items if it.id not in solved]
    client = ChatClient(sc.server) if sc.backend == "server" else None
    # The identity of what samples: the round's model weights, or the served model.
    model_hash = f"server:{client.base_url}#{client.model}" if client else verified_weights_hash(model_dir)
    tokenizer = load_tokenizer(str(model_dir))
    cache = audio_cache(cfg)
    banned = audio_tokens(str(model_dir)) if sc.ban_audio_tokens else None
    think_close = think_close_token_id(tokenizer)
    # The ground stage scores each kept trace with the real audio unless sampling already did.
    logprobs = client is None and cfg.grounding.enabled and cfg.grounding.real_logprobs == "sampled"
    start, new_traces, skipped = time.time(), 0, 0
    for shard in indices:
        path = rd.shard_path(shard, count)
        if path.exists():
            check_shard_model(path, model_hash)
            skipped += 1
            continue
        shard_items = pool[shard::count]
        requests, meta = [], []
        for item in shard_items:
            request = item_request(cfg, tokenizer, item, cache)
            prompt = request.prompt.removesuffix(sc.generation_prefix)
            audio_hash = item.audio_sha256 or sha256_file(item.audio)  # items built before validation lack it
            for j in range(sc.n):
                seed = sample_seed(cfg.seed, rd.index, item.id, j)
                requests.append(replace(request, seed=seed))
                meta.append((item, prompt, audio_hash, j, seed))
        if client is not None:
            jobs = [
                (item, r.audio, r.seed)
                for (item, _, _, j, _), r in zip(meta, requests, strict=True)
                if j == 0
            ]
            per_item = sample_shard(cfg, client, jobs, partial_path(path), tokenizer)
            outs = [c for completions in per_item for c in completions]
        else:
            outs = generate(
                get_engine(model_dir),
                requests,
                sc.temperature,
                sc.top_p,
                sc.max_tokens,
                think_close,
                banned=banned,
                logprobs=logprobs,
            )
        rows = []
        for (item, prompt, audio_hash, j, seed), out in zip(meta, outs, strict=True):
            rows.append(
                {
                    "schema_version": TRACE_SCHEMA_VERSION,
                    "trace_id": f"{item.id}#{j}",
                    "item_id": item.id,
                    "sample_index": j,
                    "audio": item.audio,
                    "audio_sha256": audio_hash,
                    "prompt": prompt,
                    "completion": sc.generation_prefix + out.text,
                    "finish_reason": out.finish_reason,
                    "num_tokens": out.num_tokens,
                    "reasoning_tokens": out.reasoning_tokens,
                    # The very tokens sampled (after the generation prefix): grounding scores these, not
                    # a re-tokenization of the text, which can differ.
                    **({} if client else {"token_ids": list(out.token_ids)}),
                    **({"sampled_logprob": logprob_record(out, think_close)} if out.logprobs else {}),
                    "question": item.question,
                    "reference": item.answer,
                    "choices": item.choices,
                    "family": item.family,
                    "category": item.category,
                    "lineage": {
                        "round": rd.index,
                        "model_dir": str(model_dir),
                        "model_sha256": model_hash,
                        # A server request asks for all n traces under the item's first seed: choice j of it.
                        "seed": seed if client is None else sample_seed(cfg.seed, rd.index, item.id, 0),
                        **({} if client is None else {"choice": j}),
                        "shard": f"{shard}/{count}",
                        "temperature": sc.temperature,
                        "top_p": sc.top_p,
                        "max_tokens": sc.max_tokens,
                    },
                }
            )
        atomic_write_jsonl(path, rows)
        partial_path(path).unlink(missing_ok=True)
        new_traces += len(rows)
        print(
            f"sample: shard {shard + 1}/{count}: {len(rows)} traces from {len(shard_items)} items -> {path}"
        )
    if client is not None:
        client.close()
    seconds = time.time() - start
    print(
        f"sample: {new_traces} new traces, {skipped} shard(s) already on disk, {seconds:.1f}s "
        f"({new_traces / max(seconds, 1e-9):.1f} traces/s)"
    )
    # Counts of this process's work: a resumed run or one array task reports only what it sampled.
    return {
        "new_traces": new_traces,
        "shards_skipped": skipped,
        "shards": count,
        "model_sha256": model_hash,
        "items": len(pool),
        "skipped_solved": len(items) - len(pool),
    }


def solved_before(rd: RoundDir) -> set[str]:
    """Ids of the items that some earlier round (1 .. rd.index - 1) found solved by every sample:
    once skipped, an item stays skipped, so the union over the rounds is taken."""
    solved: set[str] = set()
    for index in range(1, rd.index):
        path = RoundDir(rd.path.parent, index).set_aside
        if path.exists():
            solved |= set(read_json(path)["always_solved"])
    return solved


def check_shard_model(path: Path, model_hash: str) -> None:
    """A shard on disk must come from the model this round samples from, or it is stale."""
    first = next(read_jsonl(path), None)
    if first is None:
        return  # an empty shard (more shards than items) holds nothing stale
    found = first["lineage"]["model_sha256"]
    if found != model_hash:
        raise RuntimeError(
            f"{path}: sampled from model {str(found)[:12]}, but this round samples from "
            f"{model_hash[:12]}; delete the stale shard (or the round) to resample"
        )


def run(ctx: StageContext) -> dict | None:
    """The sample stage of the round (core/stages.py); None while other array tasks owe shards."""
    stats = sample_stage(ctx.cfg, ctx.data.train, ctx.model, ctx.rd, ctx.engines.get)
    return None if ctx.rd.missing_shards(ctx.rd.shard_path, ctx.cfg.sample.num_shards) else stats
