"""RL entry point: `accelerate launch distill/rl_train.py --config CFG --model DIR --round N --out DIR`.

On-policy GRPO (distill/rl/grpo.py) on the prompts of OUT/band.json, which the rl stage writes
(distill/rl/stage.py). Every rank holds the policy under DeepSpeed and a vLLM engine of its own
beside it (colocated, as TRL and verl run RL); a step, read top to bottom in `train`:
- rollout: the step's prompts (a seeded draw from the band, rl/prompts.py), rank r taking every
  world-th, G samples each from its engine, which must hold this very step's policy;
- rewards: the weighted terms of rl.rewards (rl/rewards.py), the grounding term scored on the
  same engine; group-relative advantages; groups of equal rewards masked out (DAPO);
- update: the clipped policy-gradient loss on the sampled tokens, its denominator the step's
  response tokens over every rank;
- sync: the new weights pushed into the engine (rl/sync.py), which then holds step + 1.
Every rl.save_every steps the training state is saved (OUT/checkpoints); a killed stage resumes
from there to the same final state, since each step's prompts and sampling seeds follow from the
step alone. The final policy lands in OUT/final in the family's vLLM layout.
"""

from __future__ import annotations

import argparse
import contextlib
import hashlib
import json
import math
import os
import shutil
import time
from dataclasses import asdict, dataclass, replace
from pathlib import Path

import torch

from data_pipelines.items import Item
from distill.config import Config, load_config
from distill.core.files import atomic_write_json, read_json
from distill.data import audio_cache, max_audio_items
from distill.models.registry import Family, family_of
from distill.models.tokens import audio_token_ids, control_tokens, think_close_token_id
from distill.rl.config import RESUMABLE, RLConfig
from distill.rl.grpo import group_advantages, policy_loss, zero_variance_groups
from distill.rl.metrics import collapse_warning, step_metrics
from distill.rl.policy import PromptIds, group_samples
from distill.rl.prompts import step_prompts
from distill.rl.rewards import Rewards
from distill.rl.rollout import Group, add_dependence, sample_groups
from distill.rl.sync import push_weights
from distill.rollout.engine import open_engine
from distill.training.checkpoints import read_log, resume, save_checkpoint
from distill.training.config import TrainConfig
from distill.training.distributed import build_accelerator, run_rank
from distill.training.model import build_model, merged_state_dict
from distill.training.optim import prepare_optimizer
from distill.training.packing import collate


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--config", required=True, help="distill YAML config (the run's config.yaml)")
    p.add_argument("--model", required=True, help="the policy to start from (a model directory)")
    p.add_argument("--round", required=True, type=int, help="the round (seeds the prompts and samples)")
    p.add_argument("--out", required=True, help="the stage's folder: band.json in, final/ out")
    p.add_argument("overrides", nargs="*", help="key=value config overrides")
    return p.parse_args(argv)


def micro_batches(rcfg: RLConfig, world: int) -> int:
    """Micro batches per optimizer step on each rank: its share of the step's samples."""
    return math.ceil(rcfg.prompts_per_step // world * rcfg.group_size / rcfg.micro_batch_size)


def rl_train_config(cfg: Config, world: int) -> TrainConfig:
    """The train section (parts that train, LoRA, ZeRO stage, precision) with RL's batch and rate."""
    r = cfg.rl
    return replace(
        cfg.train,
        micro_batch_size=r.micro_batch_size,
        grad_accum=micro_batches(r, world),
        learning_rate=r.learning_rate,
        warmup_steps=0,
        max_grad_norm=r.max_grad_norm,
        seed=cfg.seed,
    )


@dataclass
class Setup:
    """What set-up builds for the RL steps."""

    args: argparse.Namespace
    cfg: Config
    tcfg: TrainConfig
    out: Path
    accelerator: object
    family: Family
    model: torch.nn.Module
    optimizer: torch.optim.Optimizer
    scheduler: torch.optim.lr_scheduler.LRScheduler
    llm: object
    tokenizer: object
    prompt_ids: PromptIds
    rewards: Rewards
    band: dict[str, Item]
    partners: dict[str, Item]
    think_close_id: int | None
    banned: tuple[int, ...] | None
    pad_id: int
    plan: dict
    # The start model, frozen, for the KL term (rl.kl_coef > 0; a full copy on every rank).
    reference: torch.nn.Module | None = None

    @property
    def rl(self) -> RLConfig:
        return self.cfg.rl


def read_band(path: Path) -> tuple[dict[str, Item], dict[str, Item]]:
    """The band's items and their swap partners, as the rl stage wrote them (Item.to_json rows)."""
    band = read_json(path)

    def item(row: dict) -> Item:
        return Item(**{k: v for k, v in row.items() if k != "schema_version"})

    return (
        {row["id"]: item(row) for row in band["items"]},
        {key: item(row) for key, row in band["partners"].items()},
    )


def set_up(args: argparse.Namespace, cfg: Config) -> Setup:
    """The accelerator (DeepSpeed ZeRO), the policy and its optimizer, the colocated engine."""
    from accelerate.utils import set_seed
    from transformers import AutoConfig, AutoProcessor

    family = family_of(args.model, "--model")
    hidden = family.text_config(AutoConfig.from_pretrained(args.model)).hidden_size
    world = int(os.environ.get("WORLD_SIZE", "1"))
    tcfg = rl_train_config(cfg, world)
    processor = AutoProcessor.from_pretrained(args.model)
    reference = None
    if cfg.rl.kl_coef > 0:
        # Loaded before the accelerator exists: once DeepSpeed's ZeRO-3 config is registered,
        # transformers loads every model partitioned, and no engine would ever gather this one.
        frozen = replace(tcfg, lora=replace(tcfg.lora, enabled=False), gradient_checkpointing=False)
        reference = build_model(args.model, processor, frozen, 1).eval()
        reference.requires_grad_(False)
    accelerator = build_accelerator(tcfg, hidden)
    if accelerator.device.type == "cpu":
        torch.set_num_threads(max(1, (os.cpu_count() or 1) // accelerator.num_processes))
    set_seed(cfg.seed)
    out = Path(args.out)
    band, partners = read_band(out / "band.json")
    model = build_model(args.model, processor, tcfg, world)
    trainable = [p for p in model.parameters() if p.requires_grad]
    model, optimizer, scheduler = prepare_optimizer(
        accelerator, model, trainable, tcfg, cfg.rl.steps * cfg.rl.updates_per_step, schedule="constant"
    )
    if reference is not None:
        reference = reference.to(accelerator.device)
    # Each rank's own engine, seeded apart; it samples only after the trainer's weights are pushed.
    llm = open_engine(args.model, cfg.engine, cfg.seed + accelerator.process_index, max_audio_items(cfg.data))
    model_dir = str(args.model)
    plan = {
        "world": world,
        "seed": cfg.seed,
        "round": args.round,
        "rl_settings": settings_key(cfg.rl),
        "band": sorted(band),
        "total_steps": cfg.rl.steps,
    }
    return Setup(
        args,
        cfg,
        tcfg,
        out,
        accelerator,
        family,
        model,
        optimizer,
        scheduler,
        llm,
        processor.tokenizer,
        PromptIds(processor, lambda chunks: family.serving_audio(processor.feature_extractor, chunks)),
        Rewards(cfg.rl, cfg.filter, control_tokens(model_dir)),
        band,
        partners,
        think_close_token_id(processor.tokenizer),
        audio_token_ids(model_dir) if cfg.sample.ban_audio_tokens else None,
        processor.tokenizer.pad_token_id,
        plan,
        reference,
    )


def settings_key(r: RLConfig) -> str:
    """A digest of the rl settings a saved state depends on (all but those a resume may change)."""
    settings = {k: v for k, v in asdict(r).items() if k not in (*RESUMABLE, "enabled")}
    return hashlib.sha256(json.dumps(settings, sort_keys=True).encode()).hexdigest()


def policy_state(s: Setup) -> dict[str, torch.Tensor]:
    """The policy's full weights under the training model's names (LoRA merged), on every rank:
    under ZeRO-3 each rank's partitions are gathered first."""
    lm = s.accelerator.unwrap_model(s.model)
    gather = contextlib.nullcontext()
    if s.tcfg.zero_stage == 3:
        import deepspeed

        gather = deepspeed.zero.GatheredParameters(list(lm.model.parameters()))
    with gather, torch.no_grad():
        state = {k: v.detach().clone() for k, v in lm.model.state_dict().items()}
    if s.tcfg.lora.enabled:
        state = merged_state_dict(state, s.tcfg.lora.alpha, s.tcfg.lora.r)
    return state


def push(s: Setup, step: int) -> float:
    """The policy into the rank's engine, named as the checkpoint vLLM loads; seconds."""
    return push_weights(s.llm, s.family.checkpoint_state_dict(policy_state(s)).items(), step)


def rollout(s: Setup, step: int) -> tuple[list[Group], list[dict], dict]:
    """This rank's groups of step `step`, each trace's reward terms, and the seconds each part took."""
    cfg, rank, world = s.cfg, s.accelerator.process_index, s.accelerator.num_processes
    seed = f"{cfg.seed}:{s.args.round}"
    prompts = step_prompts(sorted(s.band), step, s.rl.prompts_per_step, seed)[rank::world]
    start = time.perf_counter()
    groups = sample_groups(
        s.llm,
        cfg,
        s.tokenizer,
        [s.band[i] for i in prompts],
        audio_cache(cfg),
        s.args.round,
        step,
        s.think_close_id,
        s.banned,
    )
    timing = {"rollout_s": time.perf_counter() - start, "grounding_s": 0.0}
    if s.rewards.weights.get("grounding"):
        cache = audio_cache(cfg)
        timing["grounding_s"] = add_dependence(
            s.llm,
            cfg,
            s.tokenizer,
            groups,
            s.partners,
            lambda it: cache.chunks(it.audio, it.audio_sha256),
            s.think_close_id,
        )
    terms = [s.rewards(t) for g in groups for t in g.traces]
    return groups, terms, timing


def all_sum(s: Setup, value: float) -> float:
    t = torch.tensor([float(value)], device=s.accelerator.device)
    return float(s.accelerator.reduce(t, reduction="sum").item())


def update(s: Setup, groups: list[Group], rewards: torch.Tensor) -> dict:
    """The clipped policy-gradient update(s) of one step on this rank's groups."""
    r, accelerator = s.rl, s.accelerator
    world, accum = accelerator.num_processes, s.tcfg.grad_accum
    advantages = group_advantages(rewards, r.group_size, scale=r.scale_rewards)
    flat = zero_variance_groups(rewards, r.group_size)
    keep = (
        (~flat).repeat_interleave(r.group_size)
        if r.drop_zero_variance
        else torch.ones_like(rewards, dtype=torch.bool)
    )
    samples = group_samples(groups, s.prompt_ids)
    sizes = [len(x.labels) - x.labels.count(-100) for x in samples]
    local = sum(n for n, k in zip(sizes, keep.tolist(), strict=True) if k)
    total = all_sum(s, local if r.loss_aggregation == "token" else int(keep.sum()))
    denominator = max(total, 1.0) / (world * accum)
    # Micro batches of similar lengths (less padding); the step's loss does not depend on them.
    by_length = sorted(range(len(samples)), key=lambda i: len(samples[i].input_ids))
    mb = r.micro_batch_size
    batches = [by_length[i : i + mb] for i in range(0, len(samples), mb)]
    if len(batches) != accum:
        raise RuntimeError(
            f"{len(batches)} micro batches on rank {accelerator.process_index}, expected {accum}"
        )
    old: list[torch.Tensor | None] = [None] * len(batches)
    ref: list[torch.Tensor | None] = [None] * len(batches)
    metrics: dict[str, list[float]] = {"clip_fraction": [], "kl": [], "logprob_diff": [], "loss": []}
    device = accelerator.device
    for update_index in range(r.updates_per_step):
        losses = []
        for b, rows in enumerate(batches):  # every rank has the same count: prompts_per_step / world x G
            batch = collate([samples[i] for i in rows], s.pad_id, False, None)
            with accelerator.accumulate(s.model):
                logp, raw, mask = batch_logprobs(s, s.model, batch)
                if update_index == 0:
                    old[b] = logp.detach()  # the policy that sampled: ratio 1 at the first update
                    sampled = sampled_logprobs(groups, rows, mask)
                    metrics["logprob_diff"].append(
                        float(((raw - sampled).abs() * mask).sum() / mask.sum().clamp(min=1))
                    )
                    if s.reference is not None:
                        with torch.no_grad():
                            ref[b] = batch_logprobs(s, s.reference, batch)[0]
                loss, m = policy_loss(
                    logp,
                    old[b],
                    advantages[rows].to(device),
                    mask & keep[rows].to(device)[:, None],
                    clip_low=r.clip_low,
                    clip_high=r.clip_high,
                    aggregation=r.loss_aggregation,
                    denominator=denominator,
                    logp_ref=ref[b],
                    kl_coef=r.kl_coef,
                )
                metrics["clip_fraction"].append(float(m["clip_fraction"]))
                metrics["kl"].append(float(m["kl"]))
                accelerator.backward(loss)
                if accelerator.sync_gradients and s.tcfg.zero_stage == 0 and s.tcfg.max_grad_norm > 0:
                    accelerator.clip_grad_norm_(
                        [p for p in s.model.parameters() if p.requires_grad], s.tcfg.max_grad_norm
                    )
                s.optimizer.step()
                s.optimizer.zero_grad()
            losses.append(loss.detach())
        s.scheduler.step()
        metrics["loss"].append(
            accelerator.reduce(torch.stack(losses).sum(), reduction="sum").item() / (world * accum)
        )
    return {
        "loss": metrics["loss"][-1],
        "clip_fraction": mean(metrics["clip_fraction"]),
        "kl": mean(metrics["kl"]),
        "logprob_diff": mean(metrics["logprob_diff"]),
        "response_tokens": int(all_sum(s, sum(sizes))),
        # Every position the updates fed the model (prompts too), over the ranks: training tok/s.
        "train_tokens": int(all_sum(s, r.updates_per_step * sum(len(x.input_ids) for x in samples))),
    }


def batch_logprobs(s: Setup, model, batch: dict) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """A model's log-probabilities of a micro batch's sampled tokens, through its forward (the
    DeepSpeed engine's for the policy); see training/loss.py token_logprobs."""
    device = s.accelerator.device
    return model(
        **{k: batch[k].to(device) for k in ("input_ids", "position_ids", "labels", "weights", "row_weights")},
        attention_mask=batch["attention_mask"].to(device),
        audio=batch["audio"],
        audio_keys=batch["audio_keys"],
        temperature=s.rl.temperature,
    )


def mean(values: list[float]) -> float:
    return round(sum(values) / len(values), 6) if values else 0.0


def sampled_logprobs(groups: list[Group], rows: list[int], mask: torch.Tensor) -> torch.Tensor:
    """The engine's log-probabilities of the sampled tokens, laid out as the trainer's [rows, T]."""
    outs = [o for g in groups for o in g.completions]
    flat = torch.tensor([lp for i in rows for lp in outs[i].logprobs], dtype=torch.float32)
    return torch.zeros(mask.shape, dtype=torch.float32).masked_scatter(mask.cpu(), flat).to(mask.device)


@dataclass
class Progress:
    """What the steps measured (this process's run: after a resume, its part)."""

    step: int
    resumed_at: int
    seconds: float = 0.0


def step_record(s: Setup, step: int, groups: list[Group], terms: list[dict], timing: dict) -> dict:
    """The step's rollout metrics over every rank (rl/metrics.py)."""
    from accelerate.utils import gather_object

    traces = [
        {"completion": t["completion"], "reasoning_tokens": t["reasoning_tokens"]}
        for g in groups
        for t in g.traces
    ]
    rewards = torch.tensor([t["reward"] for t in terms])
    dropped = int(zero_variance_groups(rewards, s.rl.group_size).sum()) if s.rl.drop_zero_variance else 0
    everything = gather_object([(terms, traces, dropped, len(groups), timing)])
    all_terms = [t for part in everything for t in part[0]]
    all_traces = [t for part in everything for t in part[1]]
    record = step_metrics(
        step + 1, all_terms, all_traces, sum(p[2] for p in everything), sum(p[3] for p in everything)
    )
    # The slowest rank's time is the step's.
    for key in timing:
        record[key] = round(max(p[4][key] for p in everything), 3)
    record["sampled_tokens"] = int(all_sum(s, sum(o.num_tokens for g in groups for o in g.completions)))
    return record


def write_rollouts(s: Setup, step: int, groups: list[Group], terms: list[dict]) -> None:
    """Every trace of the step with its reward terms and lineage, in OUT/rollouts (one file per
    rank and step, written whole), so a user can read what RL rewarded."""
    folder = s.out / "rollouts"
    folder.mkdir(parents=True, exist_ok=True)
    rank = s.accelerator.process_index
    rows, k = [], 0
    for g in groups:
        for j, (t, o) in enumerate(zip(g.traces, g.completions, strict=True)):
            rows.append(
                {
                    **t,
                    "trace_id": f"{g.item.id}#rl{step}.{j}",
                    "terms": terms[k],
                    "lineage": {"round": s.args.round, "policy_step": step, "seed": g.request.seed + j},
                    "num_tokens": o.num_tokens,
                }
            )
            k += 1
    tmp = folder / f".step-{step + 1:06d}-rank{rank}.tmp"
    tmp.write_text("".join(json.dumps(r) + "\n" for r in rows))
    tmp.rename(folder / f"step-{step + 1:06d}-rank{rank}.jsonl")


def train(s: Setup, step: int) -> Progress:
    """Steps from `step` to rl.steps, each logged (OUT/log.jsonl), the state saved every rl.save_every."""
    from tqdm import tqdm

    accelerator, out, total = s.accelerator, s.out, s.rl.steps
    main_proc = accelerator.is_main_process
    log_path = out / "log.jsonl"
    kept = read_log(log_path, step) if main_proc else []
    if main_proc:
        # The log keeps the steps the resumed state includes; later lines are run again.
        log_path.write_text("".join(line + "\n" for line in kept))
        atomic_write_json(out / "plan.json", s.plan)  # `distill status` reads total_steps from it
    first_length = json.loads(kept[0])["reasoning_tokens_mean"] if kept else None
    progress, start = Progress(step, step), time.time()
    s.model.train()
    # The engine opened on the start model; it holds the trainer's weights only once they are pushed.
    push(s, step)
    bar = tqdm(total=total, initial=step, desc="rl", disable=not main_proc, dynamic_ncols=True)
    while progress.step < total:
        step = progress.step
        groups, terms, timing = rollout(s, step)
        rewards = torch.tensor([t["reward"] for t in terms], dtype=torch.float32)
        train_start = time.perf_counter()
        learned = update(s, groups, rewards)
        timing["train_s"] = time.perf_counter() - train_start
        timing["sync_s"] = push(s, step + 1)
        record = {**step_record(s, step, groups, terms, timing), **learned}
        write_rollouts(s, step, groups, terms)
        progress.step = step + 1
        if main_proc:
            record["elapsed_s"] = round(time.time() - start, 3)
            first_length = record["reasoning_tokens_mean"] if first_length is None else first_length
            warning = collapse_warning(
                first_length, record["reasoning_tokens_mean"], s.rl.collapse_warn_fraction
            )
            if warning:
                record["warning"] = warning
                print(f"rl: step {step + 1}: {warning}", flush=True)
            with log_path.open("a") as handle:
                handle.write(json.dumps(record) + "\n")
        bar.set_postfix(reward=f"{record['reward/reward']:.3f}", acc=f"{record['accuracy']:.2f}")
        bar.update(1)
        if progress.step % s.rl.save_every == 0 and progress.step < total:
            save_checkpoint(accelerator, out, {"step": progress.step, **s.plan})
    bar.close()
    progress.seconds = time.time() - start
    return progress


def save(s: Setup, progress: Progress) -> None:
    """The final policy in the family's vLLM layout, and the stage's summary, to OUT/final."""
    accelerator, out = s.accelerator, s.out
    state = policy_state(s)
    if not accelerator.is_main_process:
        return
    inner = accelerator.unwrap_model(s.model).model
    if s.tcfg.lora.enabled:
        inner = inner.unload()
    tmp = out / ".final.tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    s.family.save(inner, tmp, state)
    lines = [json.loads(line) for line in read_log(out / "log.jsonl", progress.step)]
    summary = {
        "model": str(s.args.model),
        "steps": progress.step,
        "resumed_from_step": progress.resumed_at or None,
        "band_items": len(s.band),
        "seconds": round(progress.seconds, 2),
        "first_step": lines[0] if lines else None,
        "last_step": lines[-1] if lines else None,
        "processes": accelerator.num_processes,
        "zero_stage": s.tcfg.zero_stage,
        "lora": s.tcfg.lora.enabled,
    }
    (tmp / "rl_summary.json").write_text(json.dumps(summary, indent=2) + "\n")
    tmp.rename(out / "final")
    shutil.rmtree(out / "checkpoints", ignore_errors=True)
    if lines:
        first, last = lines[0], lines[-1]
        print(
            f"rl: {progress.step} steps on {len(s.band)} band items: reward "
            f"{first['reward/reward']:.3f} -> {last['reward/reward']:.3f}, accuracy "
            f"{first['accuracy']:.1%} -> {last['accuracy']:.1%}, reasoning "
            f"{first['reasoning_tokens_mean']:.0f} -> {last['reasoning_tokens_mean']:.0f} tokens"
        )


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    cfg = load_config(args.config, args.overrides)
    out = Path(args.out)
    if (out / "final").exists():
        shutil.rmtree(out / "checkpoints", ignore_errors=True)  # left if a kill came right after the save
        print(f"rl: {out / 'final'} exists, nothing to do")
        return
    s = set_up(args, cfg)
    progress = train(s, resume(s.accelerator, out, s.plan))
    save(s, progress)
    s.accelerator.wait_for_everyone()
    s.accelerator.end_training()
    if torch.distributed.is_initialized():
        torch.distributed.destroy_process_group()


if __name__ == "__main__":
    run_rank(main, "rl")
