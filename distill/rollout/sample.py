"""The sample stage: n traces per (audio, question) from the current model, written by shard.

A shard is items[index::count]. Each shard file appears whole (temp name, then rename), so a run
that is interrupted and re-run samples only the shards that are missing, and a Slurm array task
(`SLURM_ARRAY_TASK_ID` / `SLURM_ARRAY_TASK_COUNT`) samples just its own. Every trace carries its
lineage: item, audio hash, round, model weights hash, sampling parameters and its own seed.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, replace
from pathlib import Path

from data_pipelines.items import Item
from distill.config import Config
from distill.core.files import atomic_write_jsonl, read_json, sha256_file
from distill.core.prompts import reasoning_split
from distill.core.rows import TRACE_SCHEMA_VERSION, check_shard_inputs
from distill.core.rundir import RoundDir
from distill.core.seeds import sample_seed
from distill.core.stages import StageContext, shard_plan
from distill.data import audio_cache
from distill.models.tokens import audio_token_ids, load_tokenizer, think_close_token_id
from distill.openai_client import ChatClient
from distill.rollout.engine import (
    Completion,
    Request,
    Sampling,
    generate_batches,
    item_request,
    verified_weights_hash,
)
from distill.rollout.server import partial_path, sample_shards


def logprob_record(out: Completion, think_close_id: int | None) -> dict:
    """The sampled trace's log-probability, split where teacher-forced scoring splits it: the
    reasoning through the last `</think>`, then the answer."""
    cut = reasoning_split(out.token_ids, think_close_id)
    return {"reasoning": sum(out.logprobs[:cut]), "answer": sum(out.logprobs[cut:]), "reasoning_tokens": cut}


class EngineBackend:
    """Sampling on the round's vLLM engine: one request per item asks for its n traces (vLLM
    prepares the prompt and the audio once and seeds trace j with the item's seed + j); the traces
    keep their token ids and, for the ground stage, their log-probabilities."""

    def __init__(self, cfg: Config, model_dir: Path, get_engine: Callable, tokenizer):
        self.cfg, self.model_dir, self.get_engine = cfg, model_dir, get_engine
        self.model_hash = verified_weights_hash(model_dir)  # what samples: the round's weights
        self.banned = audio_token_ids(str(model_dir)) if cfg.sample.ban_audio_tokens else None
        self.think_close = think_close_token_id(tokenizer)
        # The ground stage scores each kept trace with the real audio unless sampling already did.
        self.logprobs = cfg.grounding.enabled and cfg.grounding.real_logprobs == "sampled"

    def sample(self, jobs: Iterable[ShardJob]) -> Iterator[tuple[ShardJob, list[Completion]]]:
        """Each shard's completions as it finishes, the shards on one engine run (generate_batches):
        the next shard's requests fill the engine while the last of the one before still decode."""
        scfg = self.cfg.sample
        settings = Sampling(
            scfg.temperature,
            scfg.top_p,
            scfg.max_tokens,
            self.think_close,
            scfg.n,
            self.banned,
            self.logprobs,
        )
        started: dict[int, ShardJob] = {}

        def batches() -> Iterator[list[Request]]:
            for index, job in enumerate(jobs):
                started[index] = job
                yield job.requests

        for index, outs in generate_batches(self.get_engine(self.model_dir), batches(), settings):
            yield started.pop(index), outs

    def trace_fields(self, out: Completion) -> dict:
        # The very tokens sampled (after the generation prefix): grounding scores these, not a
        # re-tokenization of the text, which can differ.
        record = {"sampled_logprob": logprob_record(out, self.think_close)} if out.logprobs else {}
        return {"token_ids": list(out.token_ids), **record}

    def lineage(self, seed: int, j: int) -> dict:
        return {"seed": seed + j}  # vLLM's seed of the request's sample j

    def close(self) -> None:
        pass


class ServerBackend:
    """Sampling from a served model (sample.server): one request per item asks for all n traces
    under the item's first seed; a shard's answers are kept as they come (server.py), so a
    killed shard asks again only for what is missing."""

    def __init__(self, cfg: Config, tokenizer):
        self.cfg, self.tokenizer = cfg, tokenizer
        self.client = ChatClient(cfg.sample.server)
        self.model_hash = (
            f"server:{self.client.base_url}#{self.client.model}"  # what samples: the served model
        )

    def sample(self, jobs: Iterable[ShardJob]) -> Iterator[tuple[ShardJob, list[Completion]]]:
        """Each shard's completions as it finishes, the shards' requests from one pool
        (server.sample_shards)."""
        shards = (
            (
                job,
                partial_path(job.path),
                [(item, r.audio, r.seed) for item, r in zip(job.items, job.requests, strict=True)],
            )
            for job in jobs
        )
        for job, per_item in sample_shards(self.cfg, self.client, shards, self.tokenizer):
            yield job, [c for completions in per_item for c in completions]

    def trace_fields(self, out: Completion) -> dict:
        return {}

    def lineage(self, seed: int, j: int) -> dict:
        return {
            "seed": seed,
            "choice": j,
        }  # choice j of the item's one request (a server may seed it otherwise)

    def close(self) -> None:
        self.client.close()


def sample_stage(cfg: Config, items: list[Item], model_dir: Path, rd: RoundDir, get_engine: Callable) -> dict:
    """Sample the missing shards of round `rd` from `model_dir`; return counts for the metrics."""
    count, indices = shard_plan(cfg)
    scfg = cfg.sample
    solved = solved_before(rd) if scfg.skip_solved else set()
    pool = [it for it in items if it.id not in solved]
    tokenizer = load_tokenizer(str(model_dir))
    backend = (
        ServerBackend(cfg, tokenizer)
        if scfg.backend == "server"
        else EngineBackend(cfg, model_dir, get_engine, tokenizer)
    )
    start, skipped, todo = time.time(), 0, []
    for shard in indices:
        path = rd.shard_path(shard, count)
        if path.exists():
            redo = "delete the shard (or the round) to resample"
            check_shard_inputs(path, {"lineage.model_sha256": backend.model_hash}, redo)
            skipped += 1
        else:
            todo.append(shard)
    lineage = {"round": rd.index, "model_dir": str(model_dir), "model_sha256": backend.model_hash}
    cache, new_traces = audio_cache(cfg), 0
    # Built as the backend asks for them, so that only the shards in flight hold their audio.
    jobs = (shard_job(cfg, rd, tokenizer, cache, backend, pool[shard::count], shard, count) for shard in todo)
    for job, outs in backend.sample(jobs):
        rows = [
            trace_row(
                cfg,
                item,
                prompt,
                audio_hash,
                j,
                out,
                backend,
                {**lineage, **seeding},
                f"{job.shard}/{job.count}",
            )
            for (item, prompt, audio_hash, j, seeding), out in zip(job.meta, outs, strict=True)
        ]
        atomic_write_jsonl(job.path, rows)
        partial_path(job.path).unlink(missing_ok=True)
        new_traces += len(rows)
        print(
            f"sample: shard {job.shard + 1}/{job.count}: {len(rows)} traces "
            f"from {len(job.items)} items -> {job.path}"
        )
    backend.close()
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
        "model_sha256": backend.model_hash,
        "items": len(pool),
        "skipped_solved": len(items) - len(pool),
    }


@dataclass
class ShardJob:
    """One shard's items, their engine requests (one per item, seeded), where the shard is
    written, and per trace what its row needs (item, prompt, audio hash, sample index, seeding)."""

    path: Path
    shard: int
    count: int
    items: list[Item]
    requests: list[Request]
    meta: list[tuple[Item, str, str, int, dict]]


def shard_job(
    cfg: Config,
    rd: RoundDir,
    tokenizer,
    cache,
    backend: EngineBackend | ServerBackend,
    items: list[Item],
    shard: int,
    count: int,
) -> ShardJob:
    """The requests of one shard: item i's n traces are one request under its seed."""
    requests, meta = [], []
    for item in items:
        request = item_request(cfg, tokenizer, item, cache)
        audio_hash = item.audio_sha256 or sha256_file(item.audio)  # items built before validation lack it
        seed = sample_seed(cfg.seed, rd.index, item.id, 0)
        requests.append(replace(request, seed=seed))
        meta += [(item, request.prompt, audio_hash, j, backend.lineage(seed, j)) for j in range(cfg.sample.n)]
    return ShardJob(rd.shard_path(shard, count), shard, count, items, requests, meta)


def trace_row(
    cfg: Config,
    item: Item,
    prompt: str,
    audio_hash: str,
    j: int,
    out: Completion,
    backend: EngineBackend | ServerBackend,
    lineage: dict,
    shard: str,
) -> dict:
    """One sampled trace as the sample shard holds it (core/rows.py SampleRow), with its lineage."""
    scfg = cfg.sample
    return {
        "schema_version": TRACE_SCHEMA_VERSION,
        "trace_id": f"{item.id}#{j}",
        "item_id": item.id,
        "sample_index": j,
        "audio": item.audio,
        "audio_sha256": audio_hash,
        "prompt": prompt.removesuffix(scfg.generation_prefix),
        "completion": scfg.generation_prefix + out.text,
        "finish_reason": out.finish_reason,
        "num_tokens": out.num_tokens,
        "reasoning_tokens": out.reasoning_tokens,
        **backend.trace_fields(out),
        "question": item.question,
        "reference": item.answer,
        "choices": item.choices,
        "family": item.family,
        "category": item.category,
        "lineage": {
            **lineage,
            "shard": shard,
            "temperature": scfg.temperature,
            "top_p": scfg.top_p,
            "max_tokens": scfg.max_tokens,
        },
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


def run(ctx: StageContext) -> dict | None:
    """The sample stage of the round (core/stages.py); None while other array tasks owe shards."""
    stats = sample_stage(ctx.cfg, ctx.data.train, ctx.model, ctx.rd, ctx.engines.get)
    return None if ctx.rd.missing_shards(ctx.rd.shard_path, ctx.cfg.sample.num_shards) else stats
