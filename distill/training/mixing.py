"""Data mixing for SFT: the round's kept traces plus configured extra data (train.mix).

Two kinds of extra data keep the student's other skills while it learns from its own traces:
- `text_cot`: text-only chain of thought, JSONL rows `{"id"?, "question", "reasoning", "answer"}`,
  trained as `<think>\\n{reasoning}\\n</think>\\n{answer}` on a prompt without audio;
- `direct_audio`: audio items (any data_pipelines reader format) trained to answer at once, after
  an empty think block, `<think>\\n\\n</think>\\n{answer}`.

A source's weight is rows of it per kept-trace row, so the mix follows the traces' count round
by round. Rows come out in the SFT row format of distill.training.sft_data, each with a "source" name.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from data_pipelines.audio_cache import AudioCache
from data_pipelines.sources import Source, validate_source
from distill.config import Config
from distill.core.files import read_jsonl_numbered
from distill.core.prompts import THINK_CLOSE, THINK_OPEN, chat_prompt, item_prompt
from distill.training.config import MixSourceConfig

TRACES = "traces"  # the source name of the round's kept traces in a mix
TEXT_COT_FIELDS = ("question", "reasoning", "answer")


def text_cot_rows(path: str | Path, tokenizer, system_prompt: str) -> list[dict]:
    """SFT rows of a text chain-of-thought JSONL file (no audio: `audio` is None, the prompt has
    no audio placeholder). A bad row raises ValueError naming `path:line` and the reason."""
    path = Path(path)
    rows: list[dict] = []
    seen: dict[str, int] = {}
    for lineno, obj in read_jsonl_numbered(path):
        where = f"{path}:{lineno}"
        for key in TEXT_COT_FIELDS:
            if not isinstance(obj.get(key), str) or not obj[key].strip():
                raise ValueError(f"{where}: field {key!r} is missing or not a non-empty string")
        # A tag inside the reasoning or answer would end (or reopen) the think block early.
        for key in ("reasoning", "answer"):
            if THINK_OPEN in obj[key] or THINK_CLOSE in obj[key]:
                raise ValueError(f"{where}: field {key!r} contains {THINK_OPEN} or {THINK_CLOSE}")
        row_id = obj.get("id", f"{path.stem}-{lineno}")
        if not isinstance(row_id, str) or not row_id.strip():
            raise ValueError(f"{where}: field 'id' is not a non-empty string")
        if row_id in seen:
            raise ValueError(f"{where}: duplicate id {row_id!r} (first on line {seen[row_id]})")
        seen[row_id] = lineno
        rows.append(
            {
                "id": row_id,
                "where": where,
                "audio": None,
                "prompt": chat_prompt(tokenizer, obj["question"], system_prompt, audio_items=0),
                "completion": (
                    f"{THINK_OPEN}\n{obj['reasoning'].strip()}\n{THINK_CLOSE}\n{obj['answer'].strip()}"
                ),
            }
        )
    return rows


def direct_audio_rows(path: str | Path, cfg: Config, tokenizer, cache: AudioCache) -> list[dict]:
    """SFT rows that answer audio items directly, after an empty think block.

    The items are read and validated as train sources are (any reader format, audio decoded
    through the run's cache); any bad item raises ValueError naming file:line and reason, since
    extra data is configured by hand and a silently shrunk source would skew the mix.
    """
    # Embedded audio goes where the data stage writes its own (content-addressed, so shared safely).
    inline_dir = cfg.run_dir / "data" / "audio"
    report = validate_source(Source(str(path)), cache, inline_dir, cfg.data.audio.workers)
    if report.rejects:
        first = "\n  ".join(str(r) for r in report.rejects[:5])
        more = f"\n  ... and {len(report.rejects) - 5} more" if len(report.rejects) > 5 else ""
        raise ValueError(
            f"{path}: {len(report.rejects)} bad item(s) in a direct_audio mix source:\n  {first}{more}"
        )
    rows = []
    for item in report.items:
        chunks = len(cache.chunks(item.audio, item.audio_sha256))
        rows.append(
            {
                "id": item.id,
                "where": item.source or str(path),
                "audio": item.audio,
                "audio_sha256": item.audio_sha256,
                "prompt": item_prompt(tokenizer, item, cfg.data.system_prompt, chunks),
                "completion": f"{THINK_OPEN}\n\n{THINK_CLOSE}\n{item.answer}",
            }
        )
    return rows


def _draw(n_rows: int, quota: int, rng: np.random.Generator) -> np.ndarray:
    """`quota` indices into `n_rows` rows: without replacement when there are enough, else every
    row once per full pass plus a sample of the rest, so repeat counts differ by at most one."""
    passes, rest = divmod(quota, n_rows)
    return np.concatenate([np.tile(np.arange(n_rows), passes), rng.choice(n_rows, size=rest, replace=False)])


def mix_rows(
    traces: list[dict], sources: list[tuple[str, list[dict], float]], seed: int
) -> tuple[list[dict], dict]:
    """All kept traces once, plus `round(len(traces) * weight)` rows of each (name, rows, weight)
    source, shuffled together; deterministic for a seed.

    Every row gets a "source" (a trace keeps its own, else "traces"). Returns the rows and stats:
    per source {"rows", "unique", "share"}, and "total".
    """
    names = [TRACES] + [name for name, _, _ in sources]
    if len(set(names)) != len(names):
        raise ValueError(f"mix source names must be unique (and not {TRACES!r}): {names}")
    rng = np.random.default_rng(seed)
    out = [{**row, "source": row.get("source", TRACES)} for row in traces]
    counts = {TRACES: (len(traces), len(traces))}
    for name, rows, weight in sources:
        quota = round(len(traces) * weight)
        if quota and not rows:
            raise ValueError(f"mix source {name}: no rows, but weight {weight:g} asks for {quota}")
        picked = _draw(len(rows), quota, rng) if quota else np.zeros(0, dtype=int)
        out += [{**rows[i], "source": name} for i in picked]
        counts[name] = (len(picked), len(set(picked.tolist())))
    total = len(out)
    stats: dict = {
        name: {"rows": n, "unique": k, "share": n / total if total else 0.0}
        for name, (n, k) in counts.items()
    }
    stats["total"] = total
    return [out[i] for i in rng.permutation(total)], stats


def build_mix(
    traces: list[dict], mix_cfgs: list[MixSourceConfig], cfg: Config, tokenizer, cache: AudioCache, seed: int
) -> tuple[list[dict], dict]:
    """Read each configured mix source by kind and mix it with the kept traces (see mix_rows);
    sources are named `{kind}:{file name}`."""
    readers = {  # by MixSourceConfig.kind (the config refuses other kinds)
        "text_cot": lambda path: text_cot_rows(path, tokenizer, cfg.data.system_prompt),
        "direct_audio": lambda path: direct_audio_rows(path, cfg, tokenizer, cache),
    }
    sources = [
        (f"{src.kind}:{Path(src.path).name}", readers[src.kind](src.path), src.weight) for src in mix_cfgs
    ]
    return mix_rows(traces, sources, seed)
