"""The eval stage: greedy held-out accuracy of a round's model, overall and per task family."""

from __future__ import annotations

import time
from collections import defaultdict
from collections.abc import Callable
from dataclasses import replace
from pathlib import Path

from data_pipelines.items import Item
from distill.config import Config
from distill.data import audio_cache, max_audio_items
from distill.io import atomic_write_json, atomic_write_jsonl, read_json
from distill.model_card import write_model_card
from distill.prompting import load_tokenizer
from distill.rewards.rules import RulePipeline
from distill.rollout.engine import EXPORT_MANIFEST, generate
from distill.rollout.sample import item_request
from distill.rundir import RoundDir


def eval_stage(cfg: Config, items: list[Item], model_dir: Path, rd: RoundDir, get_engine: Callable) -> dict:
    start = time.time()
    tokenizer = load_tokenizer(str(model_dir))
    cache = audio_cache(cfg)
    requests = [item_request(cfg, tokenizer, it, cache) for it in items]
    outs = generate(get_engine(model_dir), requests, 0.0, 1.0, cfg.eval.max_tokens)
    # Held-out answers are judged by the filter's own format and correctness checks (answer tag,
    # tolerance, custom verifier), so eval and filter never disagree on what "correct" means.
    rules = RulePipeline(replace(cfg.filter, checks=["format", "correct"]), ())
    per_family: dict[str, list[bool]] = defaultdict(list)
    rows, n_correct, n_format = [], 0, 0
    for item, out in zip(items, outs, strict=True):
        text = cfg.sample.generation_prefix + out.text
        result = rules.run({"item_id": item.id, "completion": text, "reference": item.answer,
                            "choices": item.choices})
        correct, well_formed = result["correct"] is None, result["format"] is None
        n_correct += correct
        n_format += well_formed
        per_family[item.family or item.category].append(correct)
        rows.append({"item_id": item.id, "completion": text, "reference": item.answer, "correct": correct,
                     "finish_reason": out.finish_reason, "num_tokens": out.num_tokens})
    stats = {
        "items": len(items),
        "accuracy": round(n_correct / max(1, len(items)), 4),
        "format_rate": round(n_format / max(1, len(items)), 4),
        "mean_tokens": round(sum(o.num_tokens for o in outs) / max(1, len(outs)), 1),
        "per_family": {k: round(sum(v) / len(v), 4) for k, v in sorted(per_family.items())},
        "model_dir": str(model_dir),
    }
    atomic_write_jsonl(rd.path / "eval_samples.jsonl", rows)
    atomic_write_json(rd.eval_json, stats)
    manifest = model_dir / EXPORT_MANIFEST
    if manifest.exists():  # the exported model's card gains the held-out numbers
        write_model_card(cfg, rd, read_json(manifest), max_audio_items(cfg.data), model_dir)
    print(f"eval: round {rd.index} accuracy {stats['accuracy']:.1%} on {len(items)} held-out items "
          f"(format {stats['format_rate']:.0%}) in {time.time() - start:.1f}s")
    return stats
