"""Readers of item sources as found in the wild, each mapping its format to the item schema.

Formats (`auto` picks one from the path):
- `jsonl`: distill manifests (data_pipelines.items schema), one item a line.
- `mmau`: a JSON file holding a list of objects, as MMAU ships (`id`, `audio_id`, `question`,
  `choices`, `answer`, `task`, `difficulty`, `sub-category`, ...).
- `hf_disk`: a Hugging Face `datasets` folder written by `save_to_disk`, with an audio column.
- `parquet`: a parquet file (as on the HF Hub), with an audio column.

A reader yields one Record per line or row: the item's fields in the schema's names, or the
error that made the line unreadable, always with the file and line (or row) it came from.
Audio embedded in a row (HF's `{"bytes", "path"}`, or `{"array", "sampling_rate"}`) is written
once to a content-addressed file under `inline_dir`; paths are resolved against `audio_root`
(default: the source's folder). Foreign column names are mapped through ALIASES, and a source's
`fields` mapping (item field -> column) overrides them.
"""

from __future__ import annotations

import hashlib
import io
import json
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from data_pipelines.config import FORMATS
from data_pipelines.items import ManifestError, store_audio_bytes

# Item field -> column names seen in public audio QA data, tried in order.
ALIASES: dict[str, tuple[str, ...]] = {
    "id": ("id", "question_id", "uid", "key"),
    "audio": ("audio", "audio_id", "audio_path", "audio_filepath", "path", "file"),
    "question": ("question", "instruction", "prompt", "query"),
    "answer": ("answer", "label", "reference", "output"),
    "choices": ("choices", "options"),
    "category": ("task", "category", "modality"),
    "family": ("sub-category", "sub_category", "subcategory", "family", "skill"),
    "difficulty": ("difficulty", "level"),
    "transcript": ("transcript", "transcription", "text"),
    "reasoning": ("reasoning",),
}
_DIFFICULTY_WORDS = {"easy": 1, "medium": 2, "hard": 3}
_CATEGORY_WORDS = {"speech": "speech", "sound": "sound", "music": "music"}


@dataclass
class Record:
    """One line or row of a source: `fields` in the item schema, or `error` when it is unreadable."""

    where: str
    fields: dict | None = None
    error: str | None = None
    reason: str = "malformed"  # the reject reason code when `error` is set


def detect_format(path: Path) -> str:
    """The format of `path` from its shape: a datasets folder, .parquet, .jsonl, or a JSON list."""
    if path.is_dir():
        if (path / "dataset_dict.json").exists():
            splits = sorted(p.name for p in path.iterdir() if p.is_dir())
            raise ManifestError(
                str(path),
                f"a DatasetDict with splits {', '.join(splits)}: give one split's folder "
                f"(e.g. {path / splits[0]})"
                if splits
                else "an empty DatasetDict",
                "unreadable_source",
            )
        if (path / "dataset_info.json").exists() or (path / "state.json").exists():
            return "hf_disk"
        raise ManifestError(
            str(path), "a folder that is not a `datasets` save_to_disk folder", "unreadable_source"
        )
    suffix = path.suffix.lower()
    if suffix == ".parquet":
        return "parquet"
    if suffix == ".jsonl":
        return "jsonl"
    if suffix == ".json":
        with path.open(encoding="utf-8-sig", errors="replace") as handle:
            head = handle.read(4096).lstrip()
        return "mmau" if head.startswith("[") else "jsonl"
    raise ManifestError(
        str(path), f"cannot tell the format from the name; give one of {FORMATS[1:]}", "unreadable_source"
    )


def read_source(
    path: str | Path,
    fmt: str = "auto",
    fields: dict[str, str] | None = None,
    audio_root: str | Path | None = None,
    inline_dir: str | Path | None = None,
) -> Iterator[Record]:
    """Yield the Records of one source. A missing or unreadable source raises ManifestError."""
    path = Path(path)
    if not path.exists():
        raise ManifestError(str(path), "source does not exist", "unreadable_source")
    fmt = detect_format(path) if fmt == "auto" else fmt
    if fmt not in FORMATS[1:]:
        raise ManifestError(
            str(path), f"unknown format {fmt!r} (known: {', '.join(FORMATS)})", "unreadable_source"
        )
    # Relative audio paths start at audio_root, else beside the file (or the datasets folder).
    root = Path(audio_root) if audio_root else path.parent
    inline = Path(inline_dir) if inline_dir else root / "audio"
    if fmt == "jsonl":
        yield from _jsonl(path)  # relative audio paths resolve in validation (data_pipelines.validate)
        return
    rows = _json_list(path) if fmt == "mmau" else _table_rows(path, fmt)
    # Ids for rows that have none: the row's index, under a name unique to this source.
    prefix = f"{path.stem}-{hashlib.sha256(str(path.resolve()).encode()).hexdigest()[:8]}"
    for index, (where, obj) in enumerate(rows):
        if isinstance(obj, str):  # a parse error
            yield Record(where, error=obj)
            continue
        try:
            yield Record(
                where, fields=map_fields(obj, fields or {}, root, inline, where, f"{prefix}-{index}")
            )
        except ManifestError as exc:
            yield Record(where, error=exc.detail, reason=exc.reason)


def _jsonl(path: Path) -> Iterator[Record]:
    """Lines of a distill manifest, unchanged (parse_item checks them against the schema)."""
    with path.open("rb") as handle:
        for lineno, raw in enumerate(handle, start=1):
            where = f"{path}:{lineno}"
            try:
                line = raw.decode("utf-8-sig" if lineno == 1 else "utf-8")
            except UnicodeDecodeError as exc:
                yield Record(where, error=f"not UTF-8 text ({exc.reason} at byte {exc.start})")
                continue
            if not line.strip():
                continue
            try:
                obj = json.loads(line)
            except json.JSONDecodeError as exc:
                yield Record(where, error=f"not valid JSON ({exc.msg})")
                continue
            yield (
                Record(where, fields=obj)
                if isinstance(obj, dict)
                else Record(where, error=f"expected a JSON object, got {type(obj).__name__}")
            )


def _json_list(path: Path) -> Iterator[tuple[str, dict | str]]:
    """Elements of a JSON list with the line each starts on, decoded one by one so that a bad
    element is reported where it is (a whole-file parse would only say the file is bad)."""
    try:
        text = path.read_text(encoding="utf-8-sig")
    except UnicodeDecodeError as exc:
        raise ManifestError(
            str(path), f"not UTF-8 text ({exc.reason} at byte {exc.start})", "unreadable_source"
        ) from None
    decoder = json.JSONDecoder()
    pos = len(text) - len(text.lstrip())
    if not text.startswith("[", pos):
        raise ManifestError(f"{path}:1", "expected a JSON list of objects", "unreadable_source")
    pos += 1
    line, counted = 1, 0  # newlines are counted as the reader moves on, once each
    while True:
        while pos < len(text) and text[pos] in " \t\r\n,":
            pos += 1
        if pos >= len(text) or text[pos] == "]":
            return
        line += text.count("\n", counted, pos)
        counted = pos
        where = f"{path}:{line}"
        try:
            obj, pos = decoder.raw_decode(text, pos)
        except json.JSONDecodeError as exc:
            yield where, f"not valid JSON ({exc.msg}); the rest of the file cannot be read"
            return
        yield where, obj if isinstance(obj, dict) else f"expected a JSON object, got {type(obj).__name__}"


def _table_rows(path: Path, fmt: str) -> Iterator[tuple[str, dict]]:
    """Rows of a parquet file or a save_to_disk folder, read as Arrow: `datasets` would decode
    audio columns with torchcodec, which CPU installs do not have; distill decodes them itself."""
    import pyarrow.parquet as pq

    try:
        if fmt == "parquet":
            batches = pq.ParquetFile(path).iter_batches(batch_size=256)
        else:
            import datasets

            batches = datasets.load_from_disk(str(path)).with_format("arrow").iter(batch_size=256)
    except Exception as exc:  # pyarrow and datasets raise many types for a bad file
        raise ManifestError(str(path), f"cannot read {fmt} source ({exc})", "unreadable_source") from None
    row = 0
    for batch in batches:
        for obj in batch.to_pylist():
            yield f"{path}:row {row}", obj
            row += 1


def _pick(obj: dict, field: str, fields: dict[str, str]):
    if field in fields:
        return obj.get(fields[field])
    return next((obj[name] for name in ALIASES[field] if obj.get(name) is not None), None)


def _audio_path(value, root: Path, inline: Path) -> tuple[str, str | None]:
    """(path, sha256 if known) of an audio column value: a path, HF bytes/path, or an array."""
    if isinstance(value, str):
        return str(Path(value) if Path(value).is_absolute() else (root / value).resolve()), None
    if isinstance(value, dict):
        if value.get("bytes"):
            fmt = Path(value.get("path") or "x.wav").suffix or ".wav"
            return store_audio_bytes(value["bytes"], fmt, inline)
        if value.get("array") is not None:
            import soundfile as sf

            rate = value.get("sampling_rate")
            if not isinstance(rate, int) or rate <= 0:
                raise ManifestError(
                    "", f"audio array without a valid sampling_rate ({rate!r})", "bad_audio_column"
                )
            buf = io.BytesIO()
            sf.write(buf, np.asarray(value["array"], dtype=np.float32), rate, format="WAV", subtype="FLOAT")
            return store_audio_bytes(buf.getvalue(), "wav", inline)
        if value.get("path"):
            return _audio_path(value["path"], root, inline)
    raise ManifestError(
        "", f"no usable audio in the audio column ({type(value).__name__})", "bad_audio_column"
    )


def map_fields(
    obj: dict, fields: dict[str, str], root: Path, inline: Path, where: str, default_id: str
) -> dict:
    """A foreign record's fields in the item schema (difficulty words -> 1..3, task -> category)."""
    out: dict = {}
    for field in ALIASES:
        value = _pick(obj, field, fields)
        if value is not None:
            out[field] = value
    row_id = out.get("id")
    out["id"] = str(row_id) if row_id is not None else default_id
    if "audio" not in out:
        raise ManifestError(
            where, "no audio column (give the column in the source's `fields`)", "missing_field"
        )
    out["audio"], sha = _audio_path(out["audio"], root, inline)
    if sha:
        out["audio_sha256"] = sha
    if "answer" in out and not isinstance(out["answer"], str):
        out["answer"] = str(out["answer"])
    if isinstance(out.get("choices"), list):
        out["choices"] = [str(c) for c in out["choices"]]
    difficulty = out.get("difficulty")
    if isinstance(difficulty, str):
        out["difficulty"] = _DIFFICULTY_WORDS.get(difficulty.lower(), 0)
    category = out.get("category")
    out["category"] = _CATEGORY_WORDS.get(str(category).lower(), "other") if category is not None else "other"
    out["source"] = where
    return out
