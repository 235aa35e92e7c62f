"""Validation: every item is checked, audio included, before any sampling.

A bad item (malformed line, missing answer, answer not among the choices, duplicate id, missing,
unreadable, truncated, empty, NaN/inf, silent, low-rate or too long audio) becomes a Reject that
names the file, the line and the reason; the good items go on. Strict mode turns any reject into
an error. Validation decodes each audio file through the audio cache, so the decode it pays for
is the one every later stage reuses.
"""

from __future__ import annotations

import time
from collections import Counter
from collections.abc import Iterable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

from tqdm import tqdm

from data_pipelines.audio import AudioError
from data_pipelines.audio_cache import AudioCache
from data_pipelines.items import Item, ManifestError, parse_item
from data_pipelines.readers import Record

PROGRESS_FROM = 500  # items from which validation shows a progress bar


class ValidationError(ValueError):
    """Strict validation found bad items; the message names the first ones."""


@dataclass
class Reject:
    where: str  # file:line, or file:row N
    reason: str  # stable code, counted in reports
    message: str
    item_id: str | None = None

    def to_json(self) -> dict:
        return {"where": self.where, "reason": self.reason, "message": self.message, "id": self.item_id}

    def __str__(self) -> str:
        return f"{self.where}: {self.reason}: {self.message}"


@dataclass
class ValidationReport:
    items: list[Item] = field(default_factory=list)
    rejects: list[Reject] = field(default_factory=list)
    audio_seconds: float = 0.0
    seconds: float = 0.0

    def by_reason(self) -> dict[str, int]:
        return dict(Counter(r.reason for r in self.rejects).most_common())

    def stats(self) -> dict:
        return {
            "items": len(self.items),
            "rejected": len(self.rejects),
            "rejected_by_reason": self.by_reason(),
            "audio_hours": round(self.audio_seconds / 3600, 4),
            "seconds": round(self.seconds, 2),
        }

    def summary(self, name: str) -> str:
        rate = (len(self.items) + len(self.rejects)) / max(self.seconds, 1e-9)
        reasons = f" {self.by_reason()}" if self.rejects else ""
        return (
            f"{name}: {len(self.items)} items valid, {len(self.rejects)} rejected{reasons} "
            f"({self.audio_seconds / 60:.1f} min of audio) in {self.seconds:.1f}s ({rate:.0f} items/s)"
        )

    def raise_if_strict(self, strict: bool, name: str) -> None:
        if strict and self.rejects:
            first = "\n  ".join(str(r) for r in self.rejects[:5])
            more = f"\n  ... and {len(self.rejects) - 5} more" if len(self.rejects) > 5 else ""
            raise ValidationError(
                f"{name}: {len(self.rejects)} bad item(s) with strict validation "
                f"(data.strict=true):\n  {first}{more}"
            )


def _check_audio(item: Item, where: str, cache: AudioCache) -> tuple[Item, float] | Reject:
    """Decode the item's audio through the cache; the item with its audio hash and length, or a Reject."""
    try:
        # The bytes' real hash, whatever the line claimed; read once, so hash and audio agree.
        audio, item.audio_sha256 = cache.load(item.audio)
    except AudioError as exc:
        return Reject(where, exc.reason, exc.detail, item.id)
    except OSError as exc:
        return Reject(where, "unreadable", f"cannot read {item.audio} ({exc.strerror})", item.id)
    return item, len(audio) / cache.policy.sample_rate


def validate_records(
    records: Iterable[Record],
    cache: AudioCache,
    base_dir: Path | None = None,
    inline_dir: Path | None = None,
    workers: int = 1,
    seen: dict[str, str] | None = None,
) -> ValidationReport:
    """Check records against the schema, for duplicate ids, and their audio; never raises for a
    bad item. `base_dir` resolves relative audio paths of distill manifests (default: the
    record's own folder); `workers` threads decode audio in parallel; `seen` (id -> where) carries
    the ids of sources validated before, so that ids stay unique across a mix."""
    start = time.time()
    report = ValidationReport()
    parsed: list[tuple[Item, str]] = []
    seen = {} if seen is None else seen
    for rec in records:
        if rec.error is not None:
            report.rejects.append(Reject(rec.where, rec.reason, rec.error))
            continue
        folder = base_dir or Path(rec.where.rsplit(":", 1)[0]).parent
        try:
            item = parse_item(rec.fields, rec.where, folder, inline_dir or folder / "audio")
        except ManifestError as exc:
            item_id = rec.fields.get("id") if isinstance(rec.fields, dict) else None
            report.rejects.append(
                Reject(rec.where, exc.reason, exc.detail, None if item_id is None else str(item_id))
            )
            continue
        item.source = item.source or rec.where
        if item.id in seen:
            report.rejects.append(
                Reject(
                    rec.where, "duplicate_id", f"duplicate id {item.id!r} (first at {seen[item.id]})", item.id
                )
            )
            continue
        seen[item.id] = rec.where
        parsed.append((item, rec.where))
    with ThreadPoolExecutor(max_workers=max(1, workers)) as pool:
        checks = pool.map(lambda p: _check_audio(p[0], p[1], cache), parsed)
        # A bar only where it helps: thousands of files take a while, a handful do not.
        results = list(
            tqdm(
                checks,
                total=len(parsed),
                desc="validate audio",
                unit="item",
                mininterval=1.0,
                disable=len(parsed) < PROGRESS_FROM,
            )
        )
    for result in results:
        if isinstance(result, Reject):
            report.rejects.append(result)
        else:
            report.items.append(result[0])
            report.audio_seconds += result[1]
    report.seconds = time.time() - start
    return report
