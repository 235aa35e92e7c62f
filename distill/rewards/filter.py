"""The filter stage: run the checks on every sampled trace, keep up to k passing traces per prompt.

Writes `filtered.jsonl` (the kept traces, SFT-ready, with their check results) and
`rejected.jsonl` (every other trace with all the reasons it failed), and returns the counts.
"""

from __future__ import annotations

import time
from collections import Counter, defaultdict
from pathlib import Path

from distill.config import Config
from distill.io import atomic_write_jsonl
from distill.prompting import load_tokenizer
from distill.rewards.checks import check_control_tokens, check_correct, check_finished, check_format
from distill.rollout.sample import read_samples
from distill.rundir import RoundDir


def control_tokens(model_dir: str) -> tuple[str, ...]:
    """The tokenizer's special tokens (chat turns, audio placeholders), which no trace may contain."""
    tokenizer = load_tokenizer(model_dir)
    return tuple(sorted({t.content for t in tokenizer.added_tokens_decoder.values() if t.special}))


def trace_failures(trace: dict, cfg: Config, forbidden: tuple[str, ...]) -> list[str]:
    """Every reason this trace fails; empty when it passes."""
    text = trace["completion"]
    results = [
        check_finished(trace["finish_reason"]),
        check_control_tokens(text, forbidden),
        check_format(text, cfg.filter.min_reasoning_chars),
        check_correct(text, trace["reference"], trace.get("choices")),
    ]
    return [r for r in results if r is not None]


def filter_stage(cfg: Config, rd: RoundDir, model_dir: Path) -> dict:
    """Check every trace of round `rd` (sampled from `model_dir`); write kept and rejected traces."""
    start = time.time()
    traces = read_samples(rd, cfg.sample.num_shards)
    by_item: dict[str, list[dict]] = defaultdict(list)
    for trace in traces:
        by_item[trace["item_id"]].append(trace)

    forbidden = control_tokens(str(model_dir))
    kept, rejected, reasons, failures_by_check = [], [], Counter(), Counter()
    correct = 0
    all_fail, all_pass = [], []
    for item_id, group in by_item.items():
        group.sort(key=lambda t: t["sample_index"])
        passing = 0
        for trace in group:
            failures = trace_failures(trace, cfg, forbidden)
            failures_by_check.update(failures)
            correct += "answer:wrong" not in failures and "answer:missing" not in failures
            passing += not failures
            if not failures and passing <= cfg.filter.keep_per_prompt:
                kept.append({**trace, "checks": "pass"})
                continue
            if not failures:
                failures = ["over_keep_per_prompt"]
            reasons[failures[0]] += 1
            rejected.append({**trace, "rejected_because": failures})
        if passing == 0:
            all_fail.append(item_id)
        elif passing == len(group):
            all_pass.append(item_id)
    atomic_write_jsonl(rd.filtered, kept)
    atomic_write_jsonl(rd.rejected, rejected)
    seconds = time.time() - start
    stats = {
        "traces": len(traces),
        "kept": len(kept),
        "kept_fraction": round(len(kept) / max(1, len(traces)), 4),
        "sample_accuracy": round(correct / max(1, len(traces)), 4),
        # Each rejected trace under its first failed check (these add up to the rejected count) ...
        "rejected_by_reason": dict(reasons.most_common()),
        # ... and every failed check of every trace.
        "failures_by_check": dict(failures_by_check.most_common()),
        "prompts": len(by_item),
        "prompts_all_failed": len(all_fail),
        "prompts_all_passed": len(all_pass),
        "all_failed_ids": sorted(all_fail),
    }
    print(f"filter: kept {len(kept)}/{len(traces)} traces ({stats['kept_fraction']:.0%}) from {len(by_item)} "
          f"prompts in {seconds:.1f}s; rejected: {dict(reasons) or 'none'}")
    return stats
