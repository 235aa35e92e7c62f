"""The rows stages exchange through the run directory, declared, with their readers.

A sample shard holds SampleRows, a grounding shard GroundingRows, `filtered.jsonl` KeptRows and
`rejected.jsonl` RejectedRows. Every stage that reads another's file reads it here, so a field
added or renamed shows in one place.
"""

from __future__ import annotations

from pathlib import Path
from typing import NotRequired, TypedDict

from distill.core.files import read_jsonl
from distill.core.rundir import RoundDir

TRACE_SCHEMA_VERSION = 1
GROUNDING_SCHEMA_VERSION = 1


class Lineage(TypedDict):
    """Where a trace came from: enough to draw it again."""

    round: int
    model_dir: str
    model_sha256: str
    seed: int
    shard: str
    temperature: float
    top_p: float
    max_tokens: int
    choice: NotRequired[int]  # a server request's choice (all n samples under one seed)


class SampledLogprob(TypedDict):
    """The sampled trace's log-probability, split where teacher-forced scoring splits it."""

    reasoning: float
    answer: float
    reasoning_tokens: int


class SampleRow(TypedDict):
    """One sampled trace (samples/shard-*.jsonl)."""

    schema_version: int
    trace_id: str  # "<item id>#<sample index>"
    item_id: str
    sample_index: int
    audio: str
    audio_sha256: str
    prompt: str
    completion: str  # the generation prefix (`<think>\n`) + the generated text
    finish_reason: str | None
    num_tokens: int
    reasoning_tokens: int | None
    token_ids: NotRequired[list[int]]  # the very tokens sampled (offline engine only)
    sampled_logprob: NotRequired[SampledLogprob]
    question: str
    reference: str
    choices: list[str] | None
    family: str | None
    category: str | None
    lineage: Lineage


class TraceDependence(TypedDict):
    """A scored trace's audio dependence (grounding shards, per trace id)."""

    logprob: float
    reasoning_tokens: int
    answer_tokens: int
    against: dict[str, dict[str, float]]
    dependence: NotRequired[float]
    answer_dependence: NotRequired[float]
    real_logprob: str  # "sampled" or "scored"


class GroundingRow(TypedDict):
    """One item's grounding measurements (grounding/shard-*.jsonl)."""

    schema_version: int
    item_id: str
    category: str | None
    family: str | None
    model_sha256: str
    swap_partner: str | None
    samples_sha256: str | None
    scorable: bool
    chance: float
    probed: bool
    probe: dict[str, list[int]]
    probe_answers: dict[str, list[str]]
    text_solvable: bool
    traces: dict[str, TraceDependence]
    passed_over: list[str]


class KeptRow(SampleRow):
    """A kept trace (filtered.jsonl): the sample with every check's result and its reward."""

    checks: dict[str, str]  # check -> "pass" or its reason code
    reward: float
    weight: NotRequired[float]  # training weight of a down-weighted (text-solvable) trace
    text_solvable: NotRequired[bool]
    grounding: NotRequired[TraceDependence]
    judge_score: NotRequired[float | None]


class RejectedRow(KeptRow):
    """A rejected trace (rejected.jsonl): every reason it failed, first the one counted."""

    rejected_because: list[str]


def read_samples(rd: RoundDir, count: int, shards: list[int] | None = None) -> list[SampleRow]:
    """The traces of a round (of some of its shards); raises if a shard is missing (sampling is not
    finished)."""
    shards = list(range(count)) if shards is None else shards
    missing = rd.missing_shards(rd.shard_path, count, shards)
    if missing:
        raise FileNotFoundError(
            f"{rd.path}: sample shard(s) {missing} of {count} missing; run the sample stage"
        )
    rows: list[SampleRow] = []
    for i in shards:
        rows.extend(read_jsonl(rd.shard_path(i, count)))  # type: ignore[arg-type]
    return rows


def read_grounding(rd: RoundDir, count: int) -> dict[str, GroundingRow]:
    """item id -> grounding row, over all shards of a round; raises if a shard is missing."""
    missing = rd.missing_shards(rd.grounding_path, count)
    if missing:
        raise FileNotFoundError(
            f"{rd.path}: grounding shard(s) {missing} of {count} missing; run the ground stage"
        )
    return {row["item_id"]: row for i in range(count) for row in read_jsonl(rd.grounding_path(i, count))}  # type: ignore[misc]


def check_shard_inputs(path: Path, expected: dict[str, object], redo: str) -> None:
    """A shard on disk must come from what its stage reads now, or it is stale. `expected`: a
    row field (dotted for a nested one: "lineage.model_sha256") -> its value now, checked on the
    shard's first row (a shard is written at once, from one model and one input); raises naming
    the field, both values and `redo` (what to delete to do the work again)."""
    first = next(read_jsonl(path), None)
    if first is None:
        return  # an empty shard (more shards than items) holds nothing stale
    for key, want in expected.items():
        found: object = first
        for part in key.split("."):
            found = found.get(part) if isinstance(found, dict) else None
        if found != want:
            raise RuntimeError(
                f"{path}: stale: written with {key} {str(found)[:16]}, but the round has "
                f"{str(want)[:16]} now; {redo}"
            )


def read_rl_log(rd: RoundDir) -> list[dict]:
    """The rl stage's step records (rl/log.jsonl, one per step: distill/rl_train.py); none where RL
    did not run in the round."""
    log = rd.rl_dir / "log.jsonl"
    return list(read_jsonl(log)) if log.exists() else []
