"""Sampling from a running OpenAI-compatible server (sample.backend=server).

One chat request per item asks for sample.n traces: the system prompt, the item's audio as
base64 WAV parts and its question, and the assistant turn pre-filled with the generation prefix
(`continue_final_message`), so the server continues inside the reasoning block as the offline
engine does. Special tokens are kept in the text (`skip_special_tokens` off), so the filter sees
what the model wrote.

A shard is resumable item by item: each item's traces are appended to a hidden partial file as
they arrive, and a re-run asks the server only for the items that file lacks. The shard is
written (atomically, in item order) once every item is in, and the partial file removed. A
server that goes away mid-shard therefore costs only the requests in flight. The requests of
all the shards a process samples share one pool, so the next shard's requests start while the last of the
one before are still out.
"""

from __future__ import annotations

import json
from collections import deque
from collections.abc import Iterable, Iterator
from concurrent.futures import FIRST_COMPLETED, Future, ThreadPoolExecutor, wait
from dataclasses import dataclass
from pathlib import Path
from typing import TextIO

import numpy as np
from tqdm import tqdm

from data_pipelines.items import Item
from distill.config import Config
from distill.core.prompts import THINK_CLOSE, question_text
from distill.openai_client import ChatClient, audio_parts
from distill.rollout.engine import Completion


class ServerSamplingError(RuntimeError):
    """The server failed an item after its retries; what was sampled before is kept."""


def item_body(cfg: Config, item: Item, audio: list[np.ndarray], seed: int) -> dict:
    """The chat request for `item`'s sample.n traces."""
    sc, rate = cfg.sample, cfg.data.sample_rate
    parts = [p for chunk in audio for p in audio_parts(chunk, rate, sc.server.chunk_seconds)]
    body = {
        "messages": [
            {"role": "system", "content": cfg.data.system_prompt},
            {
                "role": "user",
                "content": [*parts, {"type": "text", "text": question_text(item.question, item.choices)}],
            },
            {"role": "assistant", "content": sc.generation_prefix},
        ],
        "n": sc.n,
        "temperature": sc.temperature,
        "top_p": sc.top_p,
        "max_tokens": sc.max_tokens,
        "seed": seed,
        "add_generation_prompt": False,
        "continue_final_message": True,
        "skip_special_tokens": False,
    }
    if sc.server.stop_token_ids:
        body["stop_token_ids"] = list(sc.server.stop_token_ids)
    return body


def partial_path(shard_path: Path) -> Path:
    return shard_path.with_name(f".{shard_path.stem}.partial.jsonl")


def read_partial(path: Path) -> dict[str, list[dict]]:
    """Items already sampled into a partial shard; a line cut short by a kill is dropped."""
    done: dict[str, list[dict]] = {}
    for line in path.read_text().splitlines() if path.exists() else []:
        try:
            row = json.loads(line)
            done[row["item_id"]] = row["completions"]
        except (json.JSONDecodeError, KeyError, TypeError):
            continue
    return done


def completions_of(reply: dict, n: int) -> list[dict]:
    choices = sorted(reply["choices"], key=lambda c: c["index"])
    if len(choices) != n:
        raise ValueError(f"the server returned {len(choices)} choices for n={n}")
    return [
        {"text": c["message"]["content"] or "", "finish_reason": str(c.get("finish_reason"))} for c in choices
    ]


Job = tuple[Item, list[np.ndarray], int]  # an item, its audio, its seed


@dataclass
class ShardState:
    """A shard in flight: its partial file, the items already in, how many are still asked for."""

    key: object
    jobs: list[Job]
    partial: Path
    done: dict[str, list[dict]]
    out: TextIO
    waiting: int


def sample_shards(
    cfg: Config, client: ChatClient, shards: Iterable[tuple[object, Path, list[Job]]], tokenizer
) -> Iterator[tuple[object, list[list[Completion]]]]:
    """sample.n completions per (item, audio, seed) job of each (key, partial file, jobs) shard,
    yielded as (key, per-item completions) when the shard's last item is in. Items already in a
    shard's partial file are not asked again. One pool keeps sample.server.concurrency requests in
    flight across the shards, so the server's batch stays full from one shard to the next; shards
    are taken from `shards` as the pool has room. Token counts are the student tokenizer's (what
    training will see), as the served model's vocabulary may differ."""
    close_id = tokenizer.convert_tokens_to_ids(THINK_CLOSE)
    queue: deque[tuple[ShardState, Job]] = deque()
    source = iter(shards)
    pending: dict[Future, tuple[ShardState, Item]] = {}
    states: list[ShardState] = []
    bar = tqdm(desc="sample (server)", unit="item", mininterval=1.0)
    with ThreadPoolExecutor(max_workers=cfg.sample.server.concurrency) as pool:
        try:
            while True:
                while len(pending) < cfg.sample.server.concurrency:
                    if not queue:
                        shard = next(source, None)
                        if shard is None:
                            break
                        state = open_shard(*shard)
                        if not state.waiting:
                            yield close_shard(state, tokenizer, close_id)
                            continue
                        states.append(state)
                        queue.extend((state, job) for job in state.jobs if job[0].id not in state.done)
                        bar.total = (bar.total or 0) + state.waiting
                        continue
                    state, (item, audio, seed) = queue.popleft()
                    pending[pool.submit(client.chat, item_body(cfg, item, audio, seed))] = (state, item)
                if not pending:
                    break
                finished, _ = wait(pending, return_when=FIRST_COMPLETED)
                failure = None
                for future in finished:  # every answer in is saved before a failure stops the stage
                    state, item = pending.pop(future)
                    try:
                        state.done[item.id] = completions_of_reply(future.result(), cfg.sample.n)
                    except ValueError as exc:
                        failure = failure or (state, item, exc)
                        continue
                    state.out.write(
                        json.dumps({"item_id": item.id, "completions": state.done[item.id]}) + "\n"
                    )
                    state.out.flush()
                    state.waiting -= 1
                    bar.update(1)
                    if not state.waiting:
                        states.remove(state)
                        yield close_shard(state, tokenizer, close_id)
                if failure is not None:
                    state, item, exc = failure
                    raise ServerSamplingError(
                        f"sampling from {client.base_url} failed on item {item.id}: {exc}; "
                        f"{len(state.done)} of {len(state.jobs)} item(s) of this shard are saved in "
                        f"{state.partial}, and re-running the stage asks only for the rest"
                    )
        finally:
            for future in pending:
                future.cancel()
            for state in states:
                state.out.close()
            bar.close()


def open_shard(key: object, partial: Path, jobs: list[Job]) -> ShardState:
    """A shard's state, with the items its partial file already holds."""
    done = read_partial(partial)
    waiting = sum(job[0].id not in done for job in jobs)
    if done:
        print(
            f"sample: {len(done)} item(s) of this shard already sampled ({partial.name}); "
            f"asking for {waiting}"
        )
    partial.parent.mkdir(parents=True, exist_ok=True)
    return ShardState(key, jobs, partial, done, partial.open("a"), waiting)


def completions_of_reply(reply, n: int) -> list[dict]:
    """The n completions of an item's ChatReply; ValueError for a failed or malformed one."""
    if reply.body is None:
        raise ValueError(f"{reply.reason} after {reply.attempts} attempt(s) {reply.text[:200]}")
    try:
        return completions_of(reply.body, n)
    except (KeyError, TypeError) as exc:
        raise ValueError(f"malformed reply ({exc!r})") from exc


def close_shard(state: ShardState, tokenizer, close_id: int | None) -> tuple[object, list[list[Completion]]]:
    state.out.close()
    return state.key, [
        [completion(c, tokenizer, close_id) for c in state.done[item.id]] for item, _, _ in state.jobs
    ]


def completion(c: dict, tokenizer, close_id: int | None) -> Completion:
    ids = tokenizer(c["text"], add_special_tokens=False)["input_ids"]
    reasoning = ids.index(close_id) if close_id in ids else None
    return Completion(
        text=c["text"], num_tokens=len(ids), finish_reason=c["finish_reason"], reasoning_tokens=reasoning
    )
