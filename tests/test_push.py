"""The HF Hub upload plan of a round (no hub is reachable here: the plan is built with the hub
client's own CommitOperationAdd, which hashes each file locally, and push() is driven against a
recording stand-in for HfApi to check what it would send)."""

import hashlib
import json
import shutil
import subprocess
import sys

import pytest

from data_pipelines.synthetic import generate_split
from distill.core.rundir import RunDir
from distill.export.hub import dataset_plan, model_plan, push
from distill.rollout.engine import EXPORT_MANIFEST, weights_hash


@pytest.fixture
def round_dir(tmp_path, tiny_model):
    rd = RunDir(tmp_path / "run").round(2)
    shutil.copytree(tiny_model, rd.model_dir)
    (rd.model_dir / EXPORT_MANIFEST).write_text(
        json.dumps({"weights_sha256": weights_hash(rd.model_dir), "gate": "passed"})
    )
    (rd.model_dir / "README.md").write_text("# run, round 2\n")
    items = generate_split(tmp_path / "items", "train", ["pitch_level"], 2, 0, 1, 16000)
    rows = [
        {
            "id": f"{it.id}#{j}",
            "audio": it.audio,
            "audio_sha256": f"sha{i}",
            "prompt": "p",
            "completion": "<think>\nlow pitch\n</think>\nlow",
        }
        for i, it in enumerate(items)
        for j in range(2)
    ]
    rd.filtered.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return rd


def test_model_plan_is_the_exported_folder_on_the_rounds_branch(round_dir, monkeypatch):
    monkeypatch.setenv("HF_TOKEN", "hf_do_not_leak_this")
    plan = model_plan(round_dir, "me/student")
    assert (plan.repo_id, plan.repo_type, plan.revision) == ("me/student", "model", "round-002")
    files = {op.path_in_repo: op for op in plan.operations}
    assert set(files) == {p.name for p in round_dir.model_dir.iterdir()}
    assert {"model.safetensors", "config.json", "README.md", "chat_template.jinja", EXPORT_MANIFEST} <= set(
        files
    )
    weights = round_dir.model_dir / "model.safetensors"
    assert (
        files["model.safetensors"].upload_info.sha256.hex()
        == hashlib.sha256(weights.read_bytes()).hexdigest()
    )
    assert "hf_do_not_leak_this" not in plan.describe() + plan.commit_message
    # Only a model that passed the export gate goes out.
    (round_dir.model_dir / EXPORT_MANIFEST).write_text(json.dumps({"weights_sha256": "x", "gate": "pending"}))
    with pytest.raises(RuntimeError, match="passed the gate"):
        model_plan(round_dir, "me/student")


def test_dataset_plan_stores_each_clip_once_with_relative_paths(round_dir, tmp_path):
    plan = dataset_plan(round_dir, "me/traces", tmp_path / "staging")
    files = {op.path_in_repo for op in plan.operations}
    assert files == {"data/train.jsonl", "README.md", "audio/sha0.wav", "audio/sha1.wav"}
    rows = [json.loads(line) for line in (tmp_path / "staging" / "train.jsonl").read_text().splitlines()]
    assert len(rows) == 4 and {r["audio"] for r in rows} == {"audio/sha0.wav", "audio/sha1.wav"}
    assert "data_files: data/train.jsonl" in (tmp_path / "staging" / "README.md").read_text()


def test_push_creates_repo_and_branch_then_commits_the_plan(round_dir):
    calls = []

    class RecordingApi:  # the calls HfApi would receive; no hub can be reached from here
        def __getattr__(self, name):
            def record(*args, **kwargs):
                calls.append((name, args, kwargs))
                return type("Info", (), {"commit_url": "https://hub/commit/1"})()

            return record

    plan = model_plan(round_dir, "me/student")
    assert push(plan, private=True, api=RecordingApi()) == "https://hub/commit/1"
    assert [c[0] for c in calls] == ["create_repo", "create_branch", "create_commit"]
    assert calls[0][2] == {"repo_type": "model", "private": True, "exist_ok": True}
    assert calls[1][2]["branch"] == "round-002" and calls[2][2]["revision"] == "round-002"
    assert calls[2][1] == ("me/student", plan.operations)


def test_cli_dry_run_prints_the_plan(round_dir):
    done = subprocess.run(
        [
            sys.executable,
            "-m",
            "distill.cli",
            "push",
            str(round_dir.path),
            "--repo-id",
            "me/s",
            "--dataset-repo-id",
            "me/t",
            "--dry-run",
        ],
        capture_output=True,
        text=True,
        check=False,
    )
    assert done.returncode == 0, done.stderr
    assert "model me/s@round-002" in done.stdout and "model.safetensors" in done.stdout
    assert "dataset me/t@round-002" in done.stdout and "audio/sha0.wav" in done.stdout
    bad = subprocess.run(
        [sys.executable, "-m", "distill.cli", "push", str(round_dir.path.parent), "--repo-id", "x"],
        capture_output=True,
        text=True,
        check=False,
    )
    assert bad.returncode == 1 and "not a round directory" in bad.stderr
