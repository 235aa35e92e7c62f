"""The data stage of a run: configured sources (or synthetic tasks) -> validated splits on disk.

    <run dir>/data/train.jsonl, eval.jsonl, cold_start.jsonl   validated items (audio hashes filled in)
    <run dir>/data/rejects/<split>.jsonl                       every bad item: file, line, reason
    <run dir>/data/stats/<split>.json                          counts per source and reason
    <run dir>/data/audio/                                      synthetic and embedded audio
    <run dir>/cache/audio/                                     prepared waveforms (data_pipelines.audio_cache)

Each split is built once per run; a resumed run, and every later stage, reads these files.
"""

from __future__ import annotations

import tempfile
from dataclasses import dataclass, field
from pathlib import Path

from data_pipelines.audio import AudioPolicy
from data_pipelines.audio_cache import AudioCache
from data_pipelines.config import DataConfig
from data_pipelines.items import Item, write_manifest
from data_pipelines.sources import Source, build_split, validate_source
from data_pipelines.synthetic import generate_split
from data_pipelines.validate import ValidationReport
from distill.config import Config
from distill.core.files import atomic_write_jsonl, read_json
from distill.core.schema import ConfigError
from distill.models.registry import family_of


def audio_policy(data: DataConfig) -> AudioPolicy:
    a = data.audio
    return AudioPolicy(
        sample_rate=data.sample_rate,
        max_seconds=a.max_seconds,
        long_audio=a.long_audio,
        chunk_seconds=a.chunk_seconds,
        max_chunks=a.max_chunks,
        min_sample_rate=a.min_sample_rate,
        silence_peak=a.silence_peak,
    )


def audio_cache(cfg: Config) -> AudioCache:
    """The run's audio cache (every stage and process of a run builds the same one from the config)."""
    return AudioCache(cfg.data.audio.cache_dir or cfg.run_dir / "cache" / "audio", audio_policy(cfg.data))


def max_audio_items(data: DataConfig) -> int:
    """Audio inputs one prompt may carry: one, or up to max_chunks when long audio is chunked."""
    return data.audio.max_chunks if data.audio.long_audio == "chunk" else 1


def check_model_audio(cfg: Config, model_dir: Path) -> None:
    """Refuse audio settings the model cannot take, before any work: a sample rate other than its
    feature extractor's, audio items longer than it reads (the rest would be cut silently), more
    audio items per prompt than the family takes, and more audio tokens than engine.max_model_len
    leaves room for."""
    path = model_dir / "processor_config.json"
    if not path.exists():
        path = model_dir / "preprocessor_config.json"
    if not path.exists():
        return  # a model without a stored feature extractor: nothing to check against
    config = read_json(path)
    fe = config.get("feature_extractor", config)
    rate = fe.get("sampling_rate")
    if rate and rate != cfg.data.sample_rate:
        raise ConfigError(
            f"data.sample_rate={cfg.data.sample_rate}: the model's feature extractor ({path}) takes "
            f"{rate} Hz; set data.sample_rate={rate}"
        )
    a = cfg.data.audio
    item_key, item_seconds = (
        ("data.audio.chunk_seconds", a.chunk_seconds)
        if a.long_audio == "chunk"
        else ("data.audio.max_seconds", a.max_seconds)
    )
    family = family_of(model_dir)
    limit = family.max_item_seconds(fe)
    if item_seconds > limit:
        raise ConfigError(
            f"{item_key}={item_seconds:g}: {family.title} ({path}) reads at most {limit:g} s per audio "
            f"item and would cut the rest silently; use at most {limit:g}, or data.audio.long_audio=chunk"
        )
    items = max_audio_items(cfg.data)
    if family.max_audio_items is not None and items > family.max_audio_items:
        raise ConfigError(
            f"data.audio.max_chunks={items}: {family.title} takes at most {family.max_audio_items} audio "
            "item(s) per prompt; lower it"
        )
    per_item = family.audio_tokens_per_item(item_seconds, fe)
    budget = max(cfg.sample.max_tokens, cfg.eval.max_tokens + cfg.eval.answer_max_tokens)
    if items * per_item + budget >= cfg.engine.max_model_len:
        raise ConfigError(
            f"engine.max_model_len={cfg.engine.max_model_len}: {items} audio item(s) of up to "
            f"{per_item} tokens each plus {budget} new tokens do not fit; raise it or lower "
            "data.audio.max_chunks"
        )


@dataclass
class Datasets:
    train: list[Item]  # the rounds' question pool
    eval: list[Item]  # held out
    cold_start: list[Item]  # items with reference traces for round 0
    benchmarks: dict[str, list[Item]] = field(default_factory=dict)  # eval.benchmarks by name


def _source(path: str) -> list[Source]:
    return [Source(path)]


def prepare_data(cfg: Config, data_dir: Path) -> Datasets:
    """Build (first run) or read (resume) the validated splits of the run, and its benchmarks."""
    data = prepare_splits(cfg, data_dir)
    data.benchmarks = prepare_benchmarks(cfg, data_dir, data.train)
    return data


def prepare_benchmarks(cfg: Config, data_dir: Path, train: list[Item]) -> dict[str, list[Item]]:
    """Each eval.benchmarks file as a validated split `benchmark-<name>` (bad items set aside with
    file, line and reason, like any split; items also in the train split refused as not held out)."""
    out = {}
    cache = audio_cache(cfg)
    for bench in cfg.eval.benchmarks:
        source = Source(bench.path, bench.format, fields=dict(bench.fields), audio_root=bench.audio_root)
        items = build_split(
            f"benchmark-{bench.name}",
            [source],
            cache=cache,
            data_dir=data_dir,
            strict=cfg.data.strict,
            workers=cfg.data.audio.workers,
            seed=cfg.seed,
            held_out_from=train,
        )
        out[bench.name] = items[: bench.max_items or None]
    return out


def prepare_splits(cfg: Config, data_dir: Path) -> Datasets:
    """The train, eval and cold-start splits."""
    d = cfg.data
    cache = audio_cache(cfg)
    common = {
        "cache": cache,
        "data_dir": data_dir,
        "strict": d.strict,
        "workers": d.audio.workers,
        "seed": cfg.seed,
    }
    if d.train_manifest or d.train_mix:
        train_sources = [
            Source(s.path, s.format, s.weight, dict(s.fields), s.audio_root) for s in d.train_mix
        ] or _source(d.train_manifest)
        train = build_split("train", train_sources, total=d.mix_items, **common)
        evals = build_split("eval", _source(d.eval_manifest), held_out_from=train, **common)
        cold = (
            build_split("cold_start", _source(d.cold_start_manifest), **common)
            if d.cold_start_manifest
            else train
        )
        return Datasets(train, evals, cold)
    syn = d.synthetic
    splits = {"train": (syn.train_items, syn.difficulty), "eval": (syn.eval_items, syn.difficulty)}
    if syn.cold_start_difficulty not in (0, syn.difficulty):
        splits["cold_start"] = (syn.train_items, syn.cold_start_difficulty)
    items = {}
    for split, (n, difficulty) in splits.items():
        generated = data_dir / "synthetic" / f"{split}.jsonl"
        if not (data_dir / f"{split}.jsonl").exists() and not generated.exists():
            write_manifest(
                generated,
                generate_split(
                    data_dir, split, syn.families, n, syn.seed, difficulty, d.sample_rate, syn.answer_format
                ),
            )
        # Synthetic audio goes through the same validation (and cache) as any other source.
        items[split] = build_split(
            split,
            _source(str(generated)),
            held_out_from=items.get("train") if split == "eval" else None,
            **common,
        )
    return Datasets(items["train"], items["eval"], items.get("cold_start", items["train"]))


def source_report(data: DataConfig, source: Source, inline_dir: Path) -> ValidationReport:
    """Read and validate one source with the config's audio policy (embedded audio goes to `inline_dir`)."""
    cache = AudioCache(data.audio.cache_dir or None, audio_policy(data))
    report = validate_source(source, cache, inline_dir, data.audio.workers)
    for reject in report.rejects:
        print(f"rejected {reject}")
    return report


def validate_command(data: DataConfig, source: Source, rejects_out: Path | None) -> int:
    """`distill data validate`: print the report of one source, write nothing else; exit 1 when
    any item is bad."""
    with tempfile.TemporaryDirectory() as tmp:
        report = source_report(data, source, Path(tmp))
    if rejects_out:
        atomic_write_jsonl(rejects_out, [r.to_json() for r in report.rejects])
    print(report.summary(f"validate {source.path}"))
    return 1 if report.rejects else 0


def import_command(data: DataConfig, source: Source, out: Path) -> int:
    """`distill data import`: convert a source to a distill manifest at `out` (embedded audio
    written under `out`'s folder, audio/), the bad items to `<out>.rejects.jsonl`."""
    report = source_report(data, source, out.parent / "audio")
    rejects = out.with_suffix(".rejects.jsonl")
    atomic_write_jsonl(rejects, [r.to_json() for r in report.rejects])
    report.raise_if_strict(data.strict, source.path)
    if not report.items:
        raise ValueError(f"{source.path}: no valid items (see {rejects})")
    write_manifest(out, report.items)
    print(
        report.summary(f"import {source.path} -> {out}")
        + (f"; rejects in {rejects}" if report.rejects else "")
    )
    return 0
