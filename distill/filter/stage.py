"""The filter stage: check every sampled trace, then select per prompt what the next student learns.

Writes
- `filtered.jsonl`: the kept traces (SFT-ready), each with every check's result and its reward;
- `rejected.jsonl`: every other trace with all the reasons it failed (or why a passing trace was
  not kept: its prompt's pass rate outside the band, a near-duplicate, over the per-prompt cap);
- `set_aside.json`: the ids of prompts every sample failed and every sample solved (next round's
  budget: `sample.skip_solved` stops sampling the solved ones);
with the ground stage's measurements applied: traces of text-solvable items dropped or
down-weighted, traces whose reasoning does not depend on the audio rejected;
and returns the counts (per reason, per category, per check) for the round metrics.
"""

from __future__ import annotations

import time
from collections import Counter, defaultdict
from dataclasses import dataclass, field
from pathlib import Path

from distill.config import Config
from distill.core.files import atomic_write_json, atomic_write_jsonl
from distill.core.rows import read_samples
from distill.core.rundir import RoundDir
from distill.core.stages import StageContext
from distill.core.stats import distribution
from distill.filter.cold_start import cold_start_filter
from distill.filter.rules import RulePipeline, reward
from distill.filter.selection import dependence_result, grounded_results, item_decision
from distill.models.tokens import control_tokens


def run_judge(cfg: Config, traces: list[dict], results: list[dict[str, str | None]]) -> dict:
    """Score the traces that passed every rule check with the configured judge; adds a "judge"
    result (and the score) to each of them, and returns the judge's counts."""
    from distill.data import audio_cache
    from distill.filter.judge import Judge, judge_result

    todo = [i for i, r in enumerate(results) if not any(r.values())]
    if not todo:
        return {"judged": 0}
    cache = audio_cache(cfg) if cfg.filter.judge.send_audio else None
    judge = Judge(cfg.filter.judge)
    start = time.time()
    try:
        jobs = [
            (
                traces[i].get("question", ""),
                traces[i]["completion"],
                cache.get(traces[i]["audio"], traces[i].get("audio_sha256")) if cache else None,
            )
            for i in todo
        ]
        verdicts = judge.score_all(jobs, cfg.data.sample_rate)
    finally:
        judge.close()
    outcomes: Counter = Counter()
    for i, verdict in zip(todo, verdicts, strict=True):
        results[i]["judge"] = judge_result(verdict, cfg.filter.judge)
        traces[i]["judge_score"] = verdict.score
        outcomes[verdict.reason or "scored"] += 1
    seconds = time.time() - start
    print(
        f"filter: judge {judge.model} scored {outcomes['scored']}/{len(todo)} traces in {seconds:.1f}s "
        f"({dict(outcomes)})",
        flush=True,
    )
    return {"judged": len(todo), "judge_outcomes": dict(outcomes), "judge_seconds": round(seconds, 2)}


def apply_grounding(
    cfg: Config, rd: RoundDir, traces: list[dict], results: list[dict[str, str | None]]
) -> tuple[set[str], set[str]]:
    """Attach the ground stage's measurements to the traces and add the "text_solvable" and
    "audio_dependence" results; return the ids of the items answerable from text and of the
    passing traces the ground stage left unscored as ones the selection would not keep."""
    from distill.core.rows import read_grounding

    gcfg = cfg.grounding
    rows = read_grounding(rd, cfg.sample.num_shards)
    flagged = {item_id for item_id, row in rows.items() if row["text_solvable"]}
    passed_over = {tid for row in rows.values() for tid in row.get("passed_over", ())}
    for trace, result in zip(traces, results, strict=True):
        row = rows.get(trace["item_id"])
        if row is None:
            raise RuntimeError(
                f"{rd.grounding_dir}: no measurement of item {trace['item_id']!r}; the grounding "
                "shards do not match the samples (delete grounding/ to measure again)"
            )
        record = row["traces"].get(trace["trace_id"])
        trace["text_solvable"] = row["text_solvable"]
        if record is not None:
            trace["grounding"] = record
        result.update(grounded_results(result, row["text_solvable"], gcfg))
        if record is not None:
            result["audio_dependence"] = dependence_result(record, gcfg)
        elif row.get("scorable", True) and not any(result.values()) and trace["trace_id"] not in passed_over:
            # The ground stage scores every trace that passes the rules and that the selection may
            # keep; a passing trace without a score that the selection may keep was skipped there
            # (it holds an audio token and the control_tokens check is off): it cannot be vouched for.
            result["audio_dependence"] = dependence_result(None, gcfg)
    return flagged, passed_over


def grounding_stats(
    cfg: Config,
    traces: list[dict],
    kept: list[dict],
    rejected: list[dict],
    results: list[dict[str, str | None]],
    flagged: set[str],
) -> dict:
    """The filter's grounding metrics: audio dependence of kept and rejected traces, traces of
    text-solvable items, and the share of traces that cite acoustic properties."""
    stats: dict = {}
    lexical = [r["acoustic_terms"] for r in results if "acoustic_terms" in r]
    if lexical:
        stats["acoustic_terms_rate"] = round(sum(r is None for r in lexical) / len(lexical), 4)
    if not cfg.grounding.enabled:
        return stats

    def deps(rows: list[dict]) -> list[float]:
        return [r["grounding"]["dependence"] for r in rows if "dependence" in r.get("grounding", {})]

    stats["dependence_kept"] = distribution(deps(kept))
    stats["dependence_rejected"] = distribution(deps(rejected))
    stats["text_solvable_traces"] = sum(t["item_id"] in flagged for t in traces)
    stats["text_solvable_kept"] = sum(t["item_id"] in flagged for t in kept)
    return stats


@dataclass
class Selection:
    """The filter's outcome over a round's traces: what is kept, what is rejected and why."""

    kept: list[dict] = field(default_factory=list)
    rejected: list[dict] = field(default_factory=list)
    # Each rejected trace under its first failed check, and every failed check of every trace.
    reasons: Counter = field(default_factory=Counter)
    failures_by_check: Counter = field(default_factory=Counter)
    by_category: dict[str, Counter] = field(default_factory=lambda: defaultdict(Counter))
    correct: int = 0
    prompts: int = 0
    out_of_band: int = 0
    always_failed: list[str] = field(default_factory=list)
    always_solved: list[str] = field(default_factory=list)


def select_per_item(
    cfg: Config,
    rd: RoundDir,
    traces: list[dict],
    results: list[dict[str, str | None]],
    scored: bool,
    flagged: set[str],
    passed_over: set[str],
) -> Selection:
    """Decide per item which traces are kept (selection.item_decision) and record every trace as
    kept (with its checks and reward) or rejected (with all its reasons). Without the correctness
    check (`scored` false) there is no pass rate: every prompt is in the band, none is set aside
    (config validation refuses a band or skip_solved without it)."""
    fcfg, out = cfg.filter, Selection()
    by_item: dict[str, list[dict]] = defaultdict(list)
    for trace in traces:
        by_item[trace["item_id"]].append(trace)
    results_of = {t["trace_id"]: r for t, r in zip(traces, results, strict=True)}
    out.prompts = len(by_item)
    for item_id, item_traces in by_item.items():
        ordered, decision, correct = item_decision(fcfg, item_traces, results_of, scored)
        out.correct += correct
        if scored and correct == 0:
            out.always_failed.append(item_id)
        elif scored and correct == len(ordered):
            out.always_solved.append(item_id)
        out.out_of_band += not decision.in_band
        for j, trace in enumerate(ordered):
            result = results_of[trace["trace_id"]]
            if j in decision.kept and trace["trace_id"] in passed_over:
                raise RuntimeError(
                    f"{rd.grounding_dir}: the filter keeps trace {trace['trace_id']!r}, which the ground "
                    "stage left unscored as one the selection would not keep; the filter or grounding "
                    "settings changed since (or the LLM judge rejected others): delete grounding/ to "
                    "measure again, or set grounding.score_traces=passing"
                )
            failures = [r for r in result.values() if r is not None]
            out.failures_by_check.update(failures)
            row = {
                **trace,
                "checks": {k: v or "pass" for k, v in result.items()},
                "reward": reward(result, fcfg.reward_weights),
            }
            category = trace.get("category") or "other"
            if j in decision.kept:
                if trace["item_id"] in flagged and cfg.grounding.text_solvable == "downweight":
                    row["weight"] = cfg.grounding.text_solvable_weight
                out.kept.append(row)
                out.by_category[category]["kept"] += 1
                continue
            failures = failures or [decision.dropped[j]]
            out.reasons[failures[0]] += 1
            out.by_category[category][failures[0]] += 1
            out.rejected.append({**row, "rejected_because": failures})
    return out


def filter_stage(cfg: Config, rd: RoundDir, model_dir: Path) -> dict:
    """Check every trace of round `rd` (sampled from `model_dir`); write kept and rejected traces."""
    start = time.time()
    fcfg = cfg.filter
    traces = read_samples(rd, cfg.sample.num_shards)
    rules = RulePipeline(fcfg, control_tokens(str(model_dir)))
    results = [rules.run(t) for t in traces]
    rules_seconds = time.time() - start
    flagged, passed_over = (
        apply_grounding(cfg, rd, traces, results) if cfg.grounding.enabled else (set(), set())
    )
    judge_stats = run_judge(cfg, traces, results) if fcfg.judge.enabled else {}
    scored = "correct" in rules.enabled
    sel = select_per_item(cfg, rd, traces, results, scored, flagged, passed_over)

    kept, rejected = sel.kept, sel.rejected
    atomic_write_jsonl(rd.filtered, kept)
    atomic_write_jsonl(rd.rejected, rejected)
    atomic_write_json(
        rd.set_aside, {"always_failed": sorted(sel.always_failed), "always_solved": sorted(sel.always_solved)}
    )
    seconds = time.time() - start
    stats = {
        "traces": len(traces),
        "kept": len(kept),
        "kept_fraction": round(len(kept) / max(1, len(traces)), 4),
        "sample_accuracy": round(sel.correct / max(1, len(traces)), 4) if scored else None,
        "mean_reward": round(sum(r["reward"] for r in kept + rejected) / max(1, len(traces)), 4),
        # Each rejected trace under its first failed check (these add up to the rejected count) ...
        "rejected_by_reason": dict(sel.reasons.most_common()),
        # ... and every failed check of every trace.
        "failures_by_check": dict(sel.failures_by_check.most_common()),
        "by_category": {c: dict(n.most_common()) for c, n in sorted(sel.by_category.items())},
        "prompts": sel.prompts,
        "prompts_out_of_band": sel.out_of_band,
        "prompts_all_failed": len(sel.always_failed),
        "prompts_all_solved": len(sel.always_solved),
        "all_failed_ids": sorted(sel.always_failed),
        "rule_checks_per_s": round(len(traces) / max(rules_seconds, 1e-9), 1),
        **judge_stats,
        **grounding_stats(cfg, traces, kept, rejected, results, flagged),
    }
    print(
        f"filter: kept {len(kept)}/{len(traces)} traces ({stats['kept_fraction']:.0%}) from {sel.prompts} "
        f"prompts ({sel.out_of_band} outside the pass-rate band, {len(sel.always_solved)} always solved, "
        f"{len(sel.always_failed)} always failed) in {seconds:.1f}s; rejected: {dict(sel.reasons) or 'none'}",
        flush=True,
    )
    return stats


def run(ctx: StageContext) -> dict:
    """The filter stage of the round (core/stages.py); round 0 keeps the reference traces."""
    if ctx.rd.index == 0:
        return cold_start_filter(ctx)
    stats = filter_stage(ctx.cfg, ctx.rd, ctx.model)
    if stats["kept"] == 0:
        raise RuntimeError(
            f"round {ctx.rd.index}: the filter kept no traces ({stats['rejected_by_reason']}); raise "
            "sample.n or sample.max_tokens, or start from a stronger model"
        )
    return stats
