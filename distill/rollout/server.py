"""Sampling from a running OpenAI-compatible server (sample.backend=server).

One chat request per item asks for sample.n traces: the system prompt, the item's audio as
base64 WAV parts and its question, and the assistant turn pre-filled with the generation prefix
(`continue_final_message`), so the server continues inside the reasoning block as the offline
engine does. Special tokens are kept in the text (`skip_special_tokens` off), so the filter sees
what the model wrote.

A shard is resumable item by item: each item's traces are appended to a hidden partial file as
they arrive, and a re-run asks the server only for the items that file lacks. The shard is
written (atomically, in item order) once every item is in, and the partial file removed. A
server that goes away mid-shard therefore costs only the requests in flight.
"""

from __future__ import annotations

import json
from concurrent.futures import FIRST_COMPLETED, ThreadPoolExecutor, wait
from pathlib import Path

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


def sample_shard(
    cfg: Config, client: ChatClient, jobs: list[tuple[Item, list[np.ndarray], int]], partial: Path, tokenizer
) -> list[list[Completion]]:
    """sample.n completions per (item, audio, seed) job, from the partial file where present.
    Token counts are the student tokenizer's (what training will see), as the served model's
    vocabulary may differ."""
    done = read_partial(partial)
    todo = [job for job in jobs if job[0].id not in done]
    if done:
        print(
            f"sample: {len(done)} item(s) of this shard already sampled ({partial.name}); "
            f"asking for {len(todo)}"
        )
    partial.parent.mkdir(parents=True, exist_ok=True)
    with partial.open("a") as out, ThreadPoolExecutor(max_workers=cfg.sample.server.concurrency) as pool:
        pending = {
            pool.submit(client.chat, item_body(cfg, item, audio, seed)): item for item, audio, seed in todo
        }
        bar = tqdm(total=len(todo), desc="sample (server)", unit="item", mininterval=1.0)
        failure = None
        while pending and failure is None:
            finished, _ = wait(pending, return_when=FIRST_COMPLETED)
            for future in finished:
                item = pending.pop(future)
                reply = future.result()
                try:
                    if reply.body is None:
                        raise ValueError(
                            f"{reply.reason} after {reply.attempts} attempt(s) {reply.text[:200]}"
                        )
                    done[item.id] = completions_of(reply.body, cfg.sample.n)
                except (ValueError, KeyError, TypeError) as exc:
                    failure = failure or f"item {item.id}: {exc}"
                    continue
                out.write(json.dumps({"item_id": item.id, "completions": done[item.id]}) + "\n")
                out.flush()
                bar.update(1)
        bar.close()
        if failure is not None:
            for future in pending:
                future.cancel()
            raise ServerSamplingError(
                f"sampling from {client.base_url} failed on {failure}; "
                f"{len(done)} of {len(jobs)} item(s) of this "
                f"shard are saved in {partial}, and re-running the stage asks only for the rest"
            )
    close_id = tokenizer.convert_tokens_to_ids(THINK_CLOSE)
    return [[completion(c, tokenizer, close_id) for c in done[item.id]] for item, _, _ in jobs]


def completion(c: dict, tokenizer, close_id: int | None) -> Completion:
    ids = tokenizer(c["text"], add_special_tokens=False)["input_ids"]
    reasoning = ids.index(close_id) if close_id in ids else None
    return Completion(
        text=c["text"], num_tokens=len(ids), finish_reason=c["finish_reason"], reasoning_tokens=reasoning
    )
