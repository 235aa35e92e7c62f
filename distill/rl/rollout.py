"""One RL step's rollouts on the colocated engine: G samples per prompt from the policy the engine
holds, each made a trace the reward terms read, and, when the grounding term is weighted, each
trace's audio dependence (its sampled log-probability with the real audio minus its
log-probability with the counterfactual `rl.grounding_against`, per reasoning token, scored on the
same engine)."""

from __future__ import annotations

import time
from dataclasses import dataclass, field

from data_pipelines.audio_cache import AudioCache
from data_pipelines.items import Item
from distill.config import Config
from distill.core.seeds import sample_seed
from distill.grounding.counterfactual import bank_step, counterfactual_inputs
from distill.grounding.scoring import LogprobSums, ScoreJob, dependence, score
from distill.rl.sync import check_policy
from distill.rollout.engine import Completion, Request, generate, item_request
from distill.rollout.sample import logprob_record


@dataclass
class Group:
    """One prompt's G samples: the request they came from, the completions as sampled (token ids
    and the engine's log-probabilities) and the traces the reward terms read."""

    item: Item
    request: Request
    completions: list[Completion]
    traces: list[dict] = field(default_factory=list)


def rl_seed(base_seed: int, round_index: int, item_id: str, step: int) -> int:
    """The seed of an item's G samples at RL step `step` (vLLM seeds sample j with seed + j): a
    resumed stage samples exactly what an uninterrupted one did."""
    return sample_seed(base_seed, round_index, f"{item_id}@rl-step-{step}", 0)


def trace(cfg: Config, item: Item, out: Completion) -> dict:
    """A sampled completion as the reward terms read it (the fields of a sample row they use)."""
    return {
        "item_id": item.id,
        "completion": cfg.sample.generation_prefix + out.text,
        "finish_reason": out.finish_reason,
        "num_tokens": out.num_tokens,
        "reasoning_tokens": out.reasoning_tokens,
        "question": item.question,
        "reference": item.answer,
        "choices": item.choices,
        "family": item.family,
        "category": item.category,
    }


def sample_groups(
    llm,
    cfg: Config,
    tokenizer,
    items: list[Item],
    cache: AudioCache,
    round_index: int,
    step: int,
    think_close_id: int | None,
    banned: tuple[int, ...] | None,
) -> list[Group]:
    """G samples per item from the engine, which must hold policy step `step`."""
    check_policy(llm, step)
    r = cfg.rl
    requests = [
        item_request(cfg, tokenizer, it, cache, rl_seed(cfg.seed, round_index, it.id, step)) for it in items
    ]
    outs = generate(
        llm,
        requests,
        r.temperature,
        r.top_p,
        r.max_response_tokens,
        think_close_id,
        n=r.group_size,
        banned=banned,
        logprobs=True,
    )
    groups = []
    for i, (it, req) in enumerate(zip(items, requests, strict=True)):
        completions = outs[i * r.group_size : (i + 1) * r.group_size]
        groups.append(Group(it, req, completions, [trace(cfg, it, o) for o in completions]))
    return groups


def add_dependence(
    llm,
    cfg: Config,
    tokenizer,
    groups: list[Group],
    partners: dict[str, Item],
    load,
    think_close_id: int | None,
) -> float:
    """Give every trace its `dependence` (nats per reasoning token, real audio minus the
    counterfactual rl.grounding_against): the real side is the engine's log-probability of the
    tokens as sampled, the counterfactual side a teacher-forced scoring of the same tokens with the
    other audio on the same engine. An item with no counterfactual (no swap partner) gets none.
    Returns the seconds it took."""
    start = time.perf_counter()
    step = bank_step(cfg.grounding.bank_seconds, cfg.data.sample_rate)
    jobs, owners = [], []
    for g in groups:
        counter = counterfactual_inputs(
            g.item, g.request.audio, [cfg.rl.grounding_against], partners, load, cfg.seed, step
        )
        if not counter:
            continue
        audio = next(iter(counter.values()))
        for out, t in zip(g.completions, g.traces, strict=True):
            if not out.token_ids:
                continue
            jobs.append(
                ScoreJob(g.request.prompt, t["completion"], audio, completion_ids=list(out.token_ids))
            )
            owners.append((out, t))
    scored = score(llm, tokenizer, jobs, cfg.data.sample_rate)
    for (out, t), counter in zip(owners, scored, strict=True):
        record = logprob_record(out, think_close_id)  # split where the scoring splits
        real = LogprobSums(
            record["reasoning"],
            record["answer"],
            record["reasoning_tokens"],
            out.num_tokens - record["reasoning_tokens"],
        )
        t["dependence"] = dependence(real, counter.sums()).reasoning
    return time.perf_counter() - start
