"""The eval stage: does the round's model answer held-out items, does thinking longer help, does it listen?

On one vLLM engine (prefix caching on, so an item's prompt and audio are prepared once for all
its requests), per round:
- greedy accuracy overall, per category and per task family, with the traces' statistics
  (length, truncation, format errors, script drift, degeneration);
- pass@k and majority-vote accuracy over `eval.k` samples at `eval.temperature`;
- the test-time scaling curve: the greedy reasoning cut at each of `eval.budgets` tokens,
  `</think>` forced, the answer generated (greedy decoding is prefix-consistent, so the budget-b
  reasoning is the first b tokens of the full greedy trace and costs only its answer);
- the grounding gap: greedy accuracy with the real audio minus with each counterfactual
  (silence, noise, another item's audio);
- each external benchmark of `eval.benchmarks`, with MMAU's standard multiple-choice matching
  beside distill's own.
Writes eval.json (the numbers) and eval_samples.jsonl (one row per held-out item), and
eval_benchmarks/<name>.jsonl.
"""

from __future__ import annotations

import time
from collections import defaultdict
from collections.abc import Callable
from dataclasses import replace
from pathlib import Path

from data_pipelines.items import Item
from distill.config import Config
from distill.core.files import atomic_write_json, atomic_write_jsonl, read_json
from distill.core.prompts import item_prompt, reasoning_tokens, split_trace
from distill.core.rundir import RoundDir
from distill.core.seeds import sample_seed
from distill.core.stages import StageContext
from distill.data import audio_cache, max_audio_items
from distill.eval.scores import inverted_scaling, majority_vote, mmau_match, pass_at_k, trace_stats
from distill.export.model_card import write_model_card
from distill.filter.answers import answer_key, extract_answer
from distill.filter.rules import RulePipeline
from distill.grounding.counterfactual import bank_step, counterfactual_inputs, swap_partners
from distill.models.tokens import audio_token_ids, load_tokenizer, think_close_token_id
from distill.rollout.engine import EXPORT_MANIFEST, Completion, Request, generate, item_request

# Checks every eval trace goes through: what "correct" means is the filter's own (answer tag,
# tolerance, custom verifier), so eval and filter never disagree; the others feed trace statistics.
EVAL_CHECKS = ["finished", "format", "language", "degeneration", "correct"]
# Eval seeds are the same every round (round -1 is no sampling round), so rounds are compared on
# the same draws.
EVAL_ROUND = -1


def reasoning_length(out: Completion, tokenizer) -> int | None:
    """Tokens before `</think>` in a completion: as the engine counted them, else (a tokenizer
    without `</think>` as one token, or a model that spelled it in pieces) counted from the text."""
    return reasoning_tokens(
        out.reasoning_tokens,
        out.text,
        lambda text: len(tokenizer(text, add_special_tokens=False)["input_ids"]),
    )


def budget_continuation(out: Completion, budget: int, tokenizer, force: str) -> str | None:
    """The greedy trace's reasoning cut at `budget` tokens followed by `force` (`</think>`), for the
    model to answer after; None when the trace closed its reasoning within the budget, so its own
    answer stands. A trace that stopped before the budget without closing is forced whole."""
    reasoning = reasoning_length(out, tokenizer)
    if reasoning is not None and reasoning <= budget:
        return None
    if len(out.token_ids) <= budget:
        return out.text + force
    return tokenizer.decode(list(out.token_ids[:budget]), skip_special_tokens=False) + force


class Evaluator:
    """Judging and request building for one model's eval."""

    def __init__(self, cfg: Config, model_dir: Path):
        self.cfg = cfg
        self.tokenizer = load_tokenizer(str(model_dir))
        self.cache = audio_cache(cfg)
        self.rules = RulePipeline(replace(cfg.filter, checks=EVAL_CHECKS), ())
        self.prefix = cfg.sample.generation_prefix
        self.think_close = think_close_token_id(self.tokenizer)
        self.banned = audio_token_ids(str(model_dir)) if cfg.sample.ban_audio_tokens else None

    def request(self, item: Item) -> Request:
        return replace(
            item_request(self.cfg, self.tokenizer, item, self.cache),
            seed=sample_seed(self.cfg.seed, EVAL_ROUND, item.id, 0),
        )

    def judge(self, item: Item, completion: str, finish_reason: str = "stop") -> dict[str, str | None]:
        return self.rules.run(
            {
                "item_id": item.id,
                "completion": completion,
                "reference": item.answer,
                "choices": item.choices,
                "question": item.question,
                "finish_reason": finish_reason,
            }
        )

    def generate(
        self,
        llm,
        requests: list[Request],
        max_tokens: int,
        temperature: float = 0.0,
        top_p: float = 1.0,
        n: int = 1,
    ) -> list[Completion]:
        if not requests:
            return []
        return generate(
            llm, requests, temperature, top_p, max_tokens, self.think_close, n=n, banned=self.banned
        )

    def counterfactual_requests(
        self, items: list[Item], base: list[Request]
    ) -> list[tuple[int, str, Request]]:
        """(item index, kind, request) for every eval counterfactual an item has (a swap needs a
        partner: a split of two items or more)."""
        cfg = self.cfg
        partners = swap_partners(items, cfg.seed)
        step = bank_step(cfg.grounding.bank_seconds, cfg.data.sample_rate)

        def load(partner: Item) -> list:
            return self.cache.chunks(partner.audio, partner.audio_sha256)

        out = []
        for i, (item, request) in enumerate(zip(items, base, strict=True)):
            heard = counterfactual_inputs(
                item,
                request.audio,
                cfg.eval.counterfactuals,
                partners,
                load,
                cfg.seed,
                step,
                informative_only=True,
            )
            for kind, audio in heard.items():
                # The prompt has one placeholder per chunk: another item's audio may have other chunks.
                prompt = item_prompt(self.tokenizer, item, cfg.data.system_prompt, len(audio)) + self.prefix
                out.append((i, kind, replace(request, prompt=prompt, audio=audio)))
        return out


def greedy_pass(
    ev: Evaluator, llm, items: list[Item], base: list[Request], bench_requests: list[Request]
) -> tuple[list[dict], list[Completion], list[Completion]]:
    """Greedy traces with the real audio, each counterfactual and the benchmarks, in one batch:
    (the items' judged rows, their greedy completions, the benchmarks' completions)."""
    cf = ev.counterfactual_requests(items, base)
    outs = ev.generate(llm, base + [r for _, _, r in cf] + bench_requests, ev.cfg.eval.max_tokens)
    greedy, cf_outs, bench_outs = (
        outs[: len(base)],
        outs[len(base) : len(base) + len(cf)],
        outs[len(base) + len(cf) :],
    )
    rows = []
    for item, out in zip(items, greedy, strict=True):
        text = ev.prefix + out.text
        checks = ev.judge(item, text, out.finish_reason)
        rows.append(
            {
                "item_id": item.id,
                "audio": item.audio,
                "question": item.question,
                "choices": item.choices,
                "category": item.category,
                "family": item.family or item.category,
                "completion": text,
                "reference": item.answer,
                "correct": checks["correct"] is None,
                "checks": checks,
                "finish_reason": out.finish_reason,
                "num_tokens": out.num_tokens,
                "reasoning_tokens": out.reasoning_tokens,
                "budgets": {},
                "counterfactual": {},
            }
        )
    for (i, kind, _), out in zip(cf, cf_outs, strict=True):
        rows[i]["counterfactual"][kind] = (
            ev.judge(items[i], ev.prefix + out.text, out.finish_reason)["correct"] is None
        )
    return rows, greedy, bench_outs


def budget_pass(
    ev: Evaluator, llm, items: list[Item], base: list[Request], greedy: list[Completion], rows: list[dict]
) -> int:
    """Test-time scaling: each greedy trace cut at every thinking budget and answered, into the
    rows' "budgets"; returns how many answers were asked for."""
    ecfg = ev.cfg.eval
    cut: list[tuple[int, int, str]] = []
    for i, out in enumerate(greedy):
        for b in ecfg.thinking_budgets:
            continuation = budget_continuation(out, b, ev.tokenizer, ecfg.force_answer)
            if continuation is None:
                rows[i]["budgets"][str(b)] = rows[i]["correct"]
            else:
                cut.append((i, b, continuation))
    answers = ev.generate(
        llm, [replace(base[i], prompt=base[i].prompt + c) for i, _, c in cut], ecfg.answer_max_tokens
    )
    for (i, b, c), out in zip(cut, answers, strict=True):
        rows[i]["budgets"][str(b)] = ev.judge(items[i], ev.prefix + c + out.text)["correct"] is None
    for row in rows:
        row["budgets"] = {str(b): row["budgets"][str(b)] for b in ecfg.thinking_budgets}  # in budget order
    return len(cut)


def samples_pass(ev: Evaluator, llm, items: list[Item], base: list[Request], rows: list[dict]) -> list[dict]:
    """pass@k and majority vote over eval.k samples per item, into the rows; returns each
    sample's length, finish reason and checks (for the summary)."""
    ecfg, sampled = ev.cfg.eval, []
    if not ecfg.k:
        return sampled
    samples = ev.generate(llm, base, ecfg.max_tokens, ecfg.temperature, ecfg.top_p, n=ecfg.k)
    for i, item in enumerate(items):
        mine = samples[i * ecfg.k : (i + 1) * ecfg.k]
        judged = [ev.judge(item, ev.prefix + s.text, s.finish_reason) for s in mine]
        rows[i]["samples"] = [j["correct"] is None for j in judged]
        keys = [
            answer_key(
                extract_answer(ev.prefix + s.text, ev.cfg.filter.answer_tag), item.answer, item.choices
            )
            for s in mine
        ]
        rows[i]["majority"] = majority_vote(keys, rows[i]["samples"])
        sampled += [
            {"reasoning_tokens": s.reasoning_tokens, "finish_reason": s.finish_reason, "checks": j}
            for s, j in zip(mine, judged, strict=True)
        ]
    return sampled


def eval_stage(
    cfg: Config,
    items: list[Item],
    model_dir: Path,
    rd: RoundDir,
    get_engine: Callable,
    benchmarks: dict[str, list[Item]] | None = None,
) -> dict:
    """Evaluate round `rd`'s model on the held-out `items` (and `benchmarks`); write eval.json,
    eval_samples.jsonl and the benchmarks' rows; return the stats."""
    start = time.time()
    ev = Evaluator(cfg, model_dir)
    llm = get_engine(model_dir)
    bench_items = [(name, it) for name, its in (benchmarks or {}).items() for it in its]
    base = [ev.request(it) for it in items]
    seconds: dict[str, float] = {}
    t0 = time.time()
    rows, greedy, bench_outs = greedy_pass(ev, llm, items, base, [ev.request(it) for _, it in bench_items])
    seconds["greedy"] = time.time() - t0
    t0 = time.time()
    budget_answers = budget_pass(ev, llm, items, base, greedy, rows)
    seconds["budgets"] = time.time() - t0
    t0 = time.time()
    sampled_traces = samples_pass(ev, llm, items, base, rows)
    seconds["samples"] = time.time() - t0

    stats = summarize(cfg, items, rows, sampled_traces)
    stats["benchmarks"] = benchmark_results(ev, bench_items, bench_outs, rd)
    stats["model_dir"] = str(model_dir)
    greedy_requests = len(greedy) + sum(len(r["counterfactual"]) for r in rows) + len(bench_outs)
    stats["requests"] = {
        "greedy": greedy_requests,
        "budget_answers": budget_answers,
        "samples": len(base) * cfg.eval.k,
    }
    stats["phase_seconds"] = {k: round(v, 2) for k, v in seconds.items()}
    atomic_write_jsonl(rd.path / "eval_samples.jsonl", rows)
    atomic_write_json(rd.eval_json, stats)
    manifest = model_dir / EXPORT_MANIFEST
    if manifest.exists():  # the exported model's card gains the held-out numbers
        write_model_card(cfg, rd, read_json(manifest), max_audio_items(cfg.data), model_dir)
    print(summary_line(rd.index, stats, time.time() - start), flush=True)
    return stats


def accuracy(flags: list[bool]) -> float:
    return round(sum(flags) / max(1, len(flags)), 4)


def grouped(rows: list[dict], key: str) -> dict[str, float]:
    groups: dict[str, list[bool]] = defaultdict(list)
    for r in rows:
        groups[r[key]].append(r["correct"])
    return {k: accuracy(v) for k, v in sorted(groups.items())}


def summarize(cfg: Config, items: list[Item], rows: list[dict], sampled: list[dict]) -> dict:
    """eval.json's numbers from the judged rows."""
    ecfg = cfg.eval
    real = accuracy([r["correct"] for r in rows])
    curve = {b: accuracy([r["budgets"][str(b)] for r in rows]) for b in ecfg.thinking_budgets}
    by_kind, gaps = {}, {}
    for kind in ecfg.counterfactuals:
        heard = [r for r in rows if kind in r["counterfactual"]]
        if heard:  # the gap compares the same items with and without their audio
            by_kind[kind] = {
                "accuracy": accuracy([r["counterfactual"][kind] for r in heard]),
                "real_accuracy": accuracy([r["correct"] for r in heard]),
                "items": len(heard),
            }
            gaps[kind] = (
                sum(r["correct"] for r in heard) - sum(r["counterfactual"][kind] for r in heard)
            ) / len(heard)
    stats = {
        "items": len(items),
        "accuracy": real,
        "format_rate": accuracy([r["checks"]["format"] is None for r in rows]),
        "mean_tokens": round(sum(r["num_tokens"] for r in rows) / max(1, len(rows)), 1),
        "per_family": grouped(rows, "family"),
        "per_category": grouped(rows, "category"),
        "budgets": {str(b): acc for b, acc in curve.items()},
        "inverted_scaling": inverted_scaling(curve, ecfg.inverted_margin),
        "grounding": {
            "by_kind": by_kind,
            "gap_by_kind": {k: round(v, 4) for k, v in gaps.items()},
            "gap": round(sum(gaps.values()) / len(gaps), 4) if gaps else None,
        },
        "traces": {"greedy": trace_stats(rows), "sampled": trace_stats(sampled) if sampled else None},
        "k": ecfg.k,
    }
    if ecfg.k and rows:
        ks = sorted({*(2**p for p in range(ecfg.k.bit_length()) if 2**p <= ecfg.k), ecfg.k})
        stats["pass_at"] = {
            str(k): round(sum(pass_at_k(ecfg.k, sum(r["samples"]), k) for r in rows) / len(rows), 4)
            for k in ks
        }
        stats["majority_accuracy"] = accuracy([r["majority"] for r in rows])
    return stats


def benchmark_results(
    ev: Evaluator, bench_items: list[tuple[str, Item]], outs: list[Completion], rd: RoundDir
) -> dict[str, dict]:
    """Per benchmark: distill's accuracy, MMAU's standard multiple-choice accuracy (the answer after
    the reasoning, or the whole output without a think block, matched by MMAU's string_match), and
    per category; the rows go to eval_benchmarks/<name>.jsonl."""
    rows: dict[str, list[dict]] = defaultdict(list)
    for (name, item), out in zip(bench_items, outs, strict=True):
        text = ev.prefix + out.text
        checks = ev.judge(item, text, out.finish_reason)
        parts = split_trace(text)
        prediction = parts[1] if parts is not None else text.rsplit("</think>", 1)[-1]
        standard = (
            mmau_match(item.answer, prediction, item.choices) if item.choices else checks["correct"] is None
        )
        rows[name].append(
            {
                "item_id": item.id,
                "category": item.category,
                "completion": text,
                "reference": item.answer,
                "choices": item.choices,
                "correct": checks["correct"] is None,
                "mmau_correct": standard,
                "finish_reason": out.finish_reason,
            }
        )
    results = {}
    for name, judged in rows.items():
        atomic_write_jsonl(rd.path / "eval_benchmarks" / f"{name}.jsonl", judged)
        results[name] = {
            "items": len(judged),
            "accuracy": accuracy([r["correct"] for r in judged]),
            "mmau_accuracy": accuracy([r["mmau_correct"] for r in judged]),
            "per_category": grouped(judged, "category"),
        }
    return results


def summary_line(index: int, stats: dict, seconds: float) -> str:
    curve = "/".join(f"{acc:.0%}" for acc in stats["budgets"].values())
    parts = [
        (
            f"eval: round {index} accuracy {stats['accuracy']:.1%} on {stats['items']} held-out items "
            f"(format {stats['format_rate']:.0%})"
        )
    ]
    if "pass_at" in stats:
        parts.append(
            f"pass@{stats['k']} {stats['pass_at'][str(stats['k'])]:.1%}, "
            f"maj@{stats['k']} {stats['majority_accuracy']:.1%}"
        )
    if curve:
        parts.append(f"budgets {'/'.join(stats['budgets'])}: {curve}")
    if stats["grounding"]["gap"] is not None:
        parts.append(f"grounding gap {stats['grounding']['gap']:+.1%}")
    for name, b in stats.get("benchmarks", {}).items():
        parts.append(f"{name} {b['mmau_accuracy']:.1%}")
    line = ", ".join(parts) + f" in {seconds:.1f}s"
    inv = stats["inverted_scaling"]
    if inv:
        line += (
            f"\neval: inverted scaling: accuracy falls from {inv['from_accuracy']:.1%} "
            f"at {inv['from_budget']} "
            f"thinking tokens to {inv['to_accuracy']:.1%} at {inv['to_budget']}"
        )
    return line


def run(ctx: StageContext) -> dict:
    """The eval stage of the round (core/stages.py): the round's exported model."""
    return eval_stage(ctx.cfg, ctx.data.eval, ctx.rd.model_dir, ctx.rd, ctx.engines.get, ctx.data.benchmarks)
