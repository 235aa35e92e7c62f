"""The item schema: one (audio, question, reference answer) per JSONL line.

Manifest lines (schema_version 1):
    {"schema_version": 1, "id": "pitch_level-train-00000", "audio": "audio/x.wav",
     "question": "...", "choices": ["high", "low"], "answer": "high", "category": "sound",
     "family": "pitch_level", "difficulty": 1, "reasoning": "<think>...</think>\\nhigh",
     "transcript": null}
`audio` is a path relative to the manifest's folder, or absolute. `reasoning` is an optional
reference trace used for the cold start.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from pathlib import Path

from distill.io import atomic_write_jsonl, read_jsonl_numbered
from distill.rewards.checks import split_trace

SCHEMA_VERSION = 1
CATEGORIES = ("speech", "sound", "music", "other")


class ManifestError(ValueError):
    """A manifest line is malformed; the message names the file, the line and the reason."""


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

    def to_json(self) -> dict:
        return {"schema_version": SCHEMA_VERSION, **asdict(self)}


_REQUIRED = ("id", "audio", "question", "answer")


def parse_item(obj: object, where: str, base_dir: Path) -> Item:
    """Check one decoded manifest line and resolve its audio path against `base_dir`."""
    if not isinstance(obj, dict):
        raise ManifestError(f"{where}: expected a JSON object, got {type(obj).__name__}")
    version = obj.get("schema_version", SCHEMA_VERSION)
    if version != SCHEMA_VERSION:
        raise ManifestError(f"{where}: schema_version {version!r} is not supported (expected {SCHEMA_VERSION})")
    for key in _REQUIRED:
        if not isinstance(obj.get(key), str) or not obj[key].strip():
            raise ManifestError(f"{where}: field {key!r} is missing or not a non-empty string")
    known = set(Item.__dataclass_fields__) | {"schema_version"}
    unknown = sorted(set(obj) - known)
    if unknown:
        raise ManifestError(f"{where}: unknown field(s) {', '.join(unknown)}")
    fields = {k: v for k, v in obj.items() if k != "schema_version"}
    item = Item(**fields)
    choices = item.choices
    if choices is not None and (not isinstance(choices, list) or not all(isinstance(c, str) for c in choices)):
        raise ManifestError(f"{where}: 'choices' must be a list of strings")
    for key in ("reasoning", "transcript", "family"):
        if getattr(item, key) is not None and not isinstance(getattr(item, key), str):
            raise ManifestError(f"{where}: {key!r} must be a string")
    if not isinstance(item.difficulty, int):
        raise ManifestError(f"{where}: 'difficulty' must be an integer")
    if item.reasoning is not None and split_trace(item.reasoning) is None:
        raise ManifestError(f"{where}: 'reasoning' must be '<think>...</think>' followed by the answer")
    if item.category not in CATEGORIES:
        raise ManifestError(f"{where}: category {item.category!r} not in {CATEGORIES}")
    if item.choices is not None and item.answer not in item.choices:
        raise ManifestError(f"{where}: answer {item.answer!r} is not one of the choices {item.choices}")
    audio = Path(item.audio)
    item.audio = str(audio if audio.is_absolute() else (base_dir / audio).resolve())
    if not Path(item.audio).is_file():
        raise ManifestError(f"{where}: audio file {item.audio} does not exist")
    return item


def read_manifest(path: str | Path) -> list[Item]:
    """Read a JSONL manifest; any malformed line raises ManifestError with file and line number."""
    path = Path(path)
    items: list[Item] = []
    seen: dict[str, int] = {}
    try:
        for lineno, obj in read_jsonl_numbered(path):
            where = f"{path}:{lineno}"
            item = parse_item(obj, where, path.parent)
            if item.id in seen:
                raise ManifestError(f"{where}: duplicate id {item.id!r} (first on line {seen[item.id]})")
            seen[item.id] = lineno
            items.append(item)
    except ManifestError:
        raise
    except ValueError as exc:  # malformed JSON, or a line that is not an object
        raise ManifestError(str(exc)) from None
    if not items:
        raise ManifestError(f"{path}: no items")
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
