"""Splits from sources: read any number of sources, validate them, mix them by weight.

`build_split` is the data stage of a run: it turns the configured sources of a split (train,
eval, cold start) into one validated manifest in the run directory plus a rejects file, once per
run; a resumed run reads the manifest it wrote.
"""

from __future__ import annotations

import dataclasses
import hashlib
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from data_pipelines.audio_cache import AudioCache
from data_pipelines.items import Item, read_manifest, write_manifest
from data_pipelines.readers import read_source
from data_pipelines.validate import Reject, ValidationReport, validate_records
from distill.core.files import atomic_write_json, atomic_write_jsonl, read_json


class MixError(ValueError):
    """The sources cannot give the mix asked for; the message names the source and the numbers."""


@dataclass
class Source:
    path: str
    format: str = "auto"
    weight: float = 1.0
    fields: dict[str, str] = field(default_factory=dict)
    audio_root: str = ""


def mix(pools: list[list[Item]], weights: list[float], total: int, seed: int, names: list[str]) -> list[Item]:
    """Draw `total` items (0: as many as the smallest pool allows at these weights), each source's
    share proportional to its weight, without repeats; deterministic by seed, shuffled together."""
    if len(pools) == 1 and total == 0:
        return list(pools[0])
    shares = np.asarray(weights, dtype=float) / sum(weights)
    if total == 0:
        total = int(min(len(pool) / share for pool, share in zip(pools, shares, strict=True) if share > 0))
    quotas = np.floor(shares * total).astype(int)
    # Largest remainders get the items the floors left over, so the quotas add up to `total`.
    for i in np.argsort(-(shares * total - quotas), kind="stable")[: total - quotas.sum()]:
        quotas[i] += 1
    rng = np.random.default_rng(seed)
    out: list[Item] = []
    for pool, quota, name, weight in zip(pools, quotas, names, weights, strict=True):
        if quota > len(pool):
            raise MixError(
                f"{name}: the mix needs {quota} items at weight {weight:g} but the source has only "
                f"{len(pool)} valid items; lower data.mix_items or this source's weight"
            )
        out += [pool[i] for i in sorted(rng.choice(len(pool), size=quota, replace=False))]
    return [out[i] for i in rng.permutation(len(out))] if len(pools) > 1 else out


def validate_source(
    src: Source, cache: AudioCache, inline_dir: Path, workers: int = 1, seen: dict[str, str] | None = None
) -> ValidationReport:
    """Read and validate one source (raises ManifestError only when the source itself is unreadable)."""
    records = read_source(src.path, src.format, src.fields, src.audio_root or None, inline_dir)
    base_dir = Path(src.audio_root) if src.audio_root else None
    return validate_records(
        records, cache, base_dir=base_dir, inline_dir=inline_dir, workers=workers, seen=seen
    )


def build_split(
    name: str,
    sources: list[Source],
    cache: AudioCache,
    data_dir: Path,
    *,
    total: int = 0,
    seed: int = 0,
    strict: bool = False,
    workers: int = 1,
    held_out_from: list[Item] | None = None,
) -> list[Item]:
    """The validated, mixed items of split `name`, written to `data_dir/<name>.jsonl` (and the
    rejects to `data_dir/rejects/<name>.jsonl`, counts to `data_dir/stats/<name>.json`) on the
    first call; later calls read the manifest back. Items that have the audio and question of an
    item in `held_out_from` (the train split, for eval) are rejected: held out means never trained on."""
    manifest = data_dir / f"{name}.jsonl"
    stats_path = data_dir / "stats" / f"{name}.json"
    # What the split is built from: a resume (even one whose config was never saved) must not
    # reuse a split built from other sources or audio settings.
    recipe = hashlib.sha256(
        repr(([dataclasses.astuple(s) for s in sources], cache.policy.key(), total, seed)).encode()
    ).hexdigest()[:16]
    if manifest.exists():
        built = read_json(stats_path).get("recipe") if stats_path.exists() else recipe
        if built != recipe:
            raise MixError(
                f"{manifest}: built from other sources or audio settings than the config now gives; "
                f"delete {data_dir} (or use a new run_name) to rebuild it"
            )
        return read_manifest(manifest)
    inline_dir = data_dir / "audio"
    seen: dict[str, str] = {}  # ids are unique across the sources of a split
    reports = [validate_source(src, cache, inline_dir, workers, seen) for src in sources]
    if held_out_from:
        trained = {(it.audio_sha256, it.question) for it in held_out_from}
        for rep in reports:
            leaked = [it for it in rep.items if (it.audio_sha256, it.question) in trained]
            rep.items = [it for it in rep.items if (it.audio_sha256, it.question) not in trained]
            rep.rejects += [
                Reject(it.source, "in_train", "the same audio and question are in the train split", it.id)
                for it in leaked
            ]
    rejects = [
        {**r.to_json(), "source": src.path}
        for src, rep in zip(sources, reports, strict=True)
        for r in rep.rejects
    ]
    atomic_write_jsonl(data_dir / "rejects" / f"{name}.jsonl", rejects)
    for src, rep in zip(sources, reports, strict=True):
        print(rep.summary(f"data {name} <- {src.path}"), flush=True)
        for reject in rep.rejects[:10]:
            print(f"  rejected {reject}")
        if len(rep.rejects) > 10:
            print(f"  ... {len(rep.rejects) - 10} more in {data_dir / 'rejects' / f'{name}.jsonl'}")
        rep.raise_if_strict(strict, f"{src.path}")
    empty = [src.path for src, rep in zip(sources, reports, strict=True) if not rep.items]
    if empty:
        raise MixError(f"{', '.join(empty)}: no valid items (see {data_dir / 'rejects' / f'{name}.jsonl'})")
    items = mix(
        [r.items for r in reports], [s.weight for s in sources], total, seed, [s.path for s in sources]
    )
    chosen = {it.id for it in items}
    stats = {
        "items": len(items),
        "recipe": recipe,
        "sources": [
            {
                "path": s.path,
                **r.stats(),
                "weight": s.weight,
                "mixed_in": sum(it.id in chosen for it in r.items),
            }
            for s, r in zip(sources, reports, strict=True)
        ],
    }
    atomic_write_json(stats_path, stats)
    write_manifest(manifest, items)  # last: its presence means the split is complete
    return items
