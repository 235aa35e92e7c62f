"""The cold start's "filter": round 0 keeps the items' reference traces as its SFT rows."""

from __future__ import annotations

from data_pipelines.audio_cache import AudioCache
from data_pipelines.items import Item
from distill.core.files import atomic_write_jsonl
from distill.core.prompts import THINK_CLOSE, item_prompt
from distill.core.stages import StageContext
from distill.data import audio_cache
from distill.models.tokens import load_tokenizer


def cold_start_rows(items: list[Item], tokenizer, system_prompt: str, cache: AudioCache) -> list[dict]:
    """SFT rows from the items' reference traces (items without one get an empty think block)."""
    rows = []
    for item in items:
        completion = item.reasoning or f"<think>\n\n{THINK_CLOSE}\n{item.answer}"
        chunks = len(cache.chunks(item.audio, item.audio_sha256))
        rows.append(
            {
                "id": item.id,
                "audio": item.audio,
                "audio_sha256": item.audio_sha256,
                "prompt": item_prompt(tokenizer, item, system_prompt, chunks),
                "completion": completion,
            }
        )
    return rows


def cold_start_filter(ctx: StageContext) -> dict:
    """Round 0's kept rows: the reference traces of the first cold_start.items items."""
    cfg = ctx.cfg
    seed_items = ctx.data.cold_start[: cfg.cold_start.items or None]
    rows = cold_start_rows(
        seed_items, load_tokenizer(str(ctx.model)), cfg.data.system_prompt, audio_cache(cfg)
    )
    atomic_write_jsonl(ctx.rd.filtered, rows)
    return {"kept": len(rows), "source": "reference traces (cold start)"}
