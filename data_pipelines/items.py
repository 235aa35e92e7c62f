"""The item schema: one (audio, question, reference answer) per JSONL line.

Manifest lines (schema_version 2; version 1 lines, which lack the last two fields, are read too):
    {"schema_version": 2, "id": "pitch_level-train-00000", "audio": "audio/x.wav",
     "question": "...", "choices": ["high", "low"], "answer": "high", "category": "sound",
     "family": "pitch_level", "difficulty": 1, "reasoning": "<think>...</think>\\nhigh",
     "transcript": null, "audio_sha256": "9f2c...", "source": "mmau.json:12"}

- `id`, `question`, `answer`: non-empty strings; ids are unique within a split.
- `audio`: a path relative to the manifest's folder or absolute, or inline audio as
  `{"data": "<base64 of the file's bytes>", "format": "wav"}` (any format soundfile decodes);
  inline audio is written once to a content-addressed file (`<sha256>.<format>`) when read.
- `choices`: optional list of option strings, which must contain `answer` (multiple choice).
- `category`: speech, sound, music or other. `family`, `difficulty`: task family and level.
- `reasoning`: optional reference trace `<think>...</think>answer` for the cold start.
- `transcript`: optional words spoken in the audio (never shown to the model).
- `audio_sha256`: sha256 of the audio file's bytes, filled in by validation (the audio cache key).
- `source`: where the item came from (`file:line`), filled in by readers of other formats.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import os
import re
import tempfile
from dataclasses import asdict, dataclass
from pathlib import Path

from distill.core.files import atomic_write_jsonl, read_jsonl_numbered
from distill.core.prompts import split_trace

SCHEMA_VERSION = 2
READABLE_VERSIONS = (1, 2)
CATEGORIES = ("speech", "sound", "music", "other")


class ManifestError(ValueError):
    """An item is malformed. `reason` is a stable code (counted in reports); the message names the
    file, the line and the problem."""

    def __init__(self, where: str, detail: str, reason: str = "malformed"):
        super().__init__(f"{where}: {detail}" if where else detail)
        self.reason = reason
        self.detail = detail


@dataclass
class Item:
    id: str
    audio: str
    question: str
    answer: str
    choices: list[str] | None = None
    category: str = "other"
    family: str = ""
    difficulty: int = 0
    reasoning: str | None = None
    transcript: str | None = None
    audio_sha256: str | None = None
    source: str = ""

    def to_json(self) -> dict:
        return {"schema_version": SCHEMA_VERSION, **asdict(self)}


_REQUIRED = ("id", "audio", "question")
_OPTIONAL_STRINGS = ("reasoning", "transcript", "family", "audio_sha256", "source")


def store_audio_bytes(data: bytes, fmt: str, out_dir: Path) -> tuple[str, str]:
    """Write embedded audio once to `out_dir/<sha256>.<fmt>`; return (path, sha256).

    Content-addressed, so re-reading a source (or several processes reading it) writes nothing new.
    """
    digest = hashlib.sha256(data).hexdigest()
    ext = fmt.lower().lstrip(".") or "wav"
    if not re.fullmatch(r"[a-z0-9]{1,5}", ext):
        raise ManifestError("", f"audio format {fmt!r} is not a file extension (wav, flac, mp3, ...)")
    path = out_dir / f"{digest}.{ext}"
    if not path.exists():
        out_dir.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=out_dir, prefix=f".{path.name}.", suffix=".tmp")
        with os.fdopen(fd, "wb") as handle:
            handle.write(data)
        os.replace(tmp, path)
    return str(path.resolve()), digest


def _inline_audio(value: dict, where: str, inline_dir: Path | None) -> tuple[str, str]:
    if set(value) - {"data", "format"} or not isinstance(value.get("data"), str):
        raise ManifestError(where, 'inline \'audio\' must be {"data": <base64>, "format": "wav"}')
    if inline_dir is None:
        raise ManifestError(where, "inline audio needs a folder to be written to (none was given)")
    try:
        data = base64.b64decode(value["data"], validate=True)
    except (binascii.Error, ValueError):
        raise ManifestError(where, "inline 'audio' data is not valid base64") from None
    try:
        return store_audio_bytes(data, str(value.get("format") or "wav"), inline_dir)
    except ManifestError as exc:
        raise ManifestError(where, exc.detail) from None
    except OSError as exc:
        raise ManifestError(
            where, f"cannot write the inline audio to {inline_dir} ({exc.strerror})", "unreadable"
        ) from None


def parse_item(obj: object, where: str, base_dir: Path, inline_dir: Path | None = None) -> Item:
    """Check one decoded manifest line against the schema and resolve its audio path against
    `base_dir` (inline audio is written under `inline_dir`). The audio itself is checked by
    data_pipelines.validate. Raises ManifestError with a reason code."""
    if not isinstance(obj, dict):
        raise ManifestError(where, f"expected a JSON object, got {type(obj).__name__}")
    version = obj.get("schema_version", SCHEMA_VERSION)
    if version not in READABLE_VERSIONS:
        raise ManifestError(
            where, f"schema_version {version!r} is not supported (readable: {READABLE_VERSIONS})"
        )
    known = set(Item.__dataclass_fields__) | {"schema_version"}
    unknown = sorted(set(obj) - known)
    if unknown:
        raise ManifestError(where, f"unknown field(s) {', '.join(unknown)}")
    if obj.get("answer") is None or (isinstance(obj["answer"], str) and not obj["answer"].strip()):
        raise ManifestError(where, "no reference answer ('answer' is missing or empty)", "missing_answer")
    fields = {k: v for k, v in obj.items() if k != "schema_version"}
    for key in ("id", "answer"):  # numeric ids and answers are common in the wild; they mean their text
        if isinstance(fields.get(key), int | float) and not isinstance(fields[key], bool):
            fields[key] = str(fields[key])
    audio_sha256 = fields.get("audio_sha256")
    if isinstance(fields.get("audio"), dict):
        fields["audio"], audio_sha256 = _inline_audio(fields["audio"], where, inline_dir)
    for key in (*_REQUIRED, "answer"):
        if not isinstance(fields.get(key), str) or not fields[key].strip():
            raise ManifestError(
                where,
                f"field {key!r} is missing or not a non-empty string",
                "missing_field" if key not in fields else "malformed",
            )
    item = Item(**{**fields, "audio_sha256": audio_sha256})
    choices = item.choices
    if choices is not None and (
        not isinstance(choices, list) or not all(isinstance(c, str) for c in choices)
    ):
        raise ManifestError(where, "'choices' must be a list of strings")
    for key in _OPTIONAL_STRINGS:
        if getattr(item, key) is not None and not isinstance(getattr(item, key), str):
            raise ManifestError(where, f"{key!r} must be a string")
    if not isinstance(item.difficulty, int) or isinstance(item.difficulty, bool):
        raise ManifestError(where, "'difficulty' must be an integer")
    if item.reasoning is not None and split_trace(item.reasoning) is None:
        raise ManifestError(where, "'reasoning' must be '<think>...</think>' followed by the answer")
    if item.category not in CATEGORIES:
        raise ManifestError(where, f"category {item.category!r} not in {CATEGORIES}")
    if item.choices is not None and item.answer not in item.choices:
        raise ManifestError(
            where, f"answer {item.answer!r} is not one of the choices {item.choices}", "answer_not_in_choices"
        )
    audio = Path(item.audio)
    item.audio = str(audio if audio.is_absolute() else (base_dir / audio).resolve())
    return item


def read_manifest(path: str | Path) -> list[Item]:
    """Read a JSONL manifest in this schema, failing on the first bad line (ManifestError naming
    file and line). For data from the wild, use data_pipelines.validate, which reports and goes on."""
    path = Path(path)
    items: list[Item] = []
    seen: dict[str, int] = {}
    try:
        for lineno, obj in read_jsonl_numbered(path):
            where = f"{path}:{lineno}"
            item = parse_item(obj, where, path.parent, path.parent / "audio")
            if item.id in seen:
                raise ManifestError(
                    where, f"duplicate id {item.id!r} (first on line {seen[item.id]})", "duplicate_id"
                )
            seen[item.id] = lineno
            items.append(item)
    except ManifestError:
        raise
    except ValueError as exc:  # malformed JSON, or a line that is not an object
        raise ManifestError("", str(exc)) from None  # the message already names file and line
    if not items:
        raise ManifestError(str(path), "no items", "empty_source")
    return items


def write_manifest(path: str | Path, items: list[Item]) -> None:
    """Write items atomically, audio paths relative to the manifest's folder where possible."""
    path = Path(path)
    rows = []
    for item in items:
        row = item.to_json()
        audio = Path(item.audio)
        if audio.is_absolute() and audio.is_relative_to(path.parent.resolve()):
            row["audio"] = str(audio.relative_to(path.parent.resolve()))
        rows.append(row)
    atomic_write_jsonl(path, rows)
