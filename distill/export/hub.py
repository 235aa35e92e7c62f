"""Pushing a round to the Hugging Face Hub: the exported model (one branch per round, with its
model card) and, when asked, the round's kept traces as a dataset with their audio.

A push is a plan first: the repository, the branch, and one `CommitOperationAdd` per file (the
hub client computes each file's size and sha256 locally). The plan is what `--dry-run` prints and
what the tests check; `push` hands exactly those operations to `HfApi.create_commit`. The token
is the hub client's own business (the HF_TOKEN environment variable or `huggingface-cli login`'s
cache): distill never reads, stores, prints or writes it.
"""

from __future__ import annotations

import json
import tempfile
from dataclasses import dataclass
from pathlib import Path

from distill.core.files import read_json, read_jsonl
from distill.core.rundir import RoundDir
from distill.rollout.engine import EXPORT_MANIFEST


@dataclass
class PushPlan:
    repo_id: str
    repo_type: str  # "model" or "dataset"
    revision: str  # the branch this round goes to
    operations: list  # huggingface_hub.CommitOperationAdd
    commit_message: str

    def describe(self) -> str:
        files = "\n".join(
            f"  {op.path_in_repo} ({op.upload_info.size} bytes, sha256 {op.upload_info.sha256.hex()[:12]})"
            for op in self.operations
        )
        return f"{self.repo_type} {self.repo_id}@{self.revision}: {self.commit_message}\n{files}"


def branch(rd: RoundDir) -> str:
    return f"round-{rd.index:03d}"


def model_plan(rd: RoundDir, repo_id: str) -> PushPlan:
    """The exported model directory as it is (weights, configs, processor, chat template, card)."""
    from huggingface_hub import CommitOperationAdd

    manifest = rd.model_dir / EXPORT_MANIFEST
    if not manifest.exists() or read_json(manifest).get("gate") != "passed":
        raise RuntimeError(f"{rd.model_dir}: no export that passed the gate; run the export stage first")
    ops = [
        CommitOperationAdd(path_in_repo=p.name, path_or_fileobj=str(p))
        for p in sorted(rd.model_dir.iterdir())
        if p.is_file()
    ]
    digest = read_json(manifest)["weights_sha256"]
    return PushPlan(repo_id, "model", branch(rd), ops, f"Round {rd.index} (weights {digest[:12]})")


def dataset_plan(rd: RoundDir, repo_id: str, staging: Path) -> PushPlan:
    """The round's kept traces as `data/train.jsonl` with each trace's audio under `audio/` (by
    content hash, so a clip shared by traces is stored once), and a dataset card."""
    from huggingface_hub import CommitOperationAdd

    if not rd.filtered.exists():
        raise RuntimeError(f"{rd.filtered}: the round has no kept traces yet; run the filter stage first")
    rows, audio = [], {}
    for row in read_jsonl(rd.filtered):
        if row.get("audio"):
            name = f"audio/{row.get('audio_sha256') or Path(row['audio']).stem}{Path(row['audio']).suffix}"
            audio[name] = Path(row["audio"])
            row = {**row, "audio": name}
        rows.append(row)
    staging.mkdir(parents=True, exist_ok=True)
    (staging / "train.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    (staging / "README.md").write_text(
        f"---\ntags: [audio, reasoning, distill]\nconfigs:\n- config_name: default\n"
        f"  data_files: data/train.jsonl\n---\n\n"
        f"# Kept traces of round {rd.index}\n\n"
        f"{len(rows)} reasoning traces that passed distill's filter (correct, "
        f"well-formed, grounded in the audio), with {len(audio)} audio clips under `audio/`.\n"
    )
    ops = [
        CommitOperationAdd(path_in_repo="data/train.jsonl", path_or_fileobj=str(staging / "train.jsonl")),
        CommitOperationAdd(path_in_repo="README.md", path_or_fileobj=str(staging / "README.md")),
    ]
    ops += [
        CommitOperationAdd(path_in_repo=name, path_or_fileobj=str(path))
        for name, path in sorted(audio.items())
    ]
    return PushPlan(repo_id, "dataset", branch(rd), ops, f"Round {rd.index}: {len(rows)} kept traces")


def push(plan: PushPlan, private: bool = True, api=None) -> str:
    """Create the repository and the round's branch if needed, then commit the plan's files;
    returns the commit's URL."""
    from huggingface_hub import HfApi

    api = api or HfApi()
    api.create_repo(plan.repo_id, repo_type=plan.repo_type, private=private, exist_ok=True)
    api.create_branch(plan.repo_id, branch=plan.revision, repo_type=plan.repo_type, exist_ok=True)
    info = api.create_commit(
        plan.repo_id,
        plan.operations,
        commit_message=plan.commit_message,
        revision=plan.revision,
        repo_type=plan.repo_type,
    )
    return info.commit_url


def push_round(
    rd: RoundDir, repo_id: str, dataset_repo_id: str = "", private: bool = True, dry_run: bool = False
) -> list[str]:
    """Push (or, dry, describe) a round's model and optionally its kept traces; returns what was done."""
    done = []
    with tempfile.TemporaryDirectory() as staging:
        plans = [model_plan(rd, repo_id)]
        if dataset_repo_id:
            plans.append(dataset_plan(rd, dataset_repo_id, Path(staging)))
        for plan in plans:
            done.append(
                plan.describe()
                if dry_run
                else f"{plan.repo_type} {plan.repo_id}@{plan.revision}: {push(plan, private)}"
            )
    return done
