"""The rl stage in a round on the real engines (2 DeepSpeed ranks on gloo, a vLLM engine beside
each): it raises the mean reward of a learnable task, its engines sample the trainer's policy at
every step, the export serves its policy, a SIGKILLed stage resumes to the uninterrupted result,
and the grounding reward ranks a model that cannot hear below one that can."""

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from safetensors.torch import load_file, save_file

from distill.config import load_config
from distill.core.files import read_json, read_jsonl
from distill.data import audio_cache
from distill.grounding.counterfactual import swap_partners
from distill.models.registry import family_of
from distill.models.tokens import control_tokens, load_tokenizer, think_close_token_id
from distill.rl.rewards import Rewards
from distill.rl.rollout import add_dependence, sample_groups
from distill.rl.sync import push_weights
from distill.rollout.engine import EngineCache, weights_hash
from tests.test_e2e import TINY_RUN

pytestmark = [pytest.mark.e2e, pytest.mark.xdist_group("rl_stage")]

RL_RUN = [
    *TINY_RUN,
    "data.synthetic.train_items=16",
    "loop.rounds=1",
    "grounding.enabled=false",  # the rl stage does not read it (CI time)
    "rl.enabled=true",
    "rl.steps=6",
    "rl.prompts_per_step=8",
    "rl.group_size=8",
    "rl.band=[1,3]",
    "rl.temperature=0.7",
    "rl.learning_rate=2e-4",
    "rl.max_response_tokens=48",
    "rl.micro_batch_size=16",
    "rl.save_every=3",
    "rl.on_empty_band=fail",  # the test's band must not be empty
]
METRICS = (
    "reward/reward",
    "reward/correct",
    "reward/format",
    "accuracy",
    "reasoning_tokens_mean",
    "reasoning_tokens_p90",
    "kl",
    "clip_fraction",
    "groups_dropped_zero_variance",
    "rollout_s",
    "train_s",
    "sync_s",
    "logprob_diff",
)


def stage(out: Path, stages: str, index: int = 1, *overrides: str, **popen) -> subprocess.Popen:
    """`distill stage STAGES --round INDEX` of the test's run in `out`, logging to out/stage.log."""
    cmd = [sys.executable, "-m", "distill.cli", "stage", stages, "configs/demo_cpu.yaml", "--round"]
    log = (out / "stage.log").open("a")
    return subprocess.Popen(
        [*cmd, str(index), f"output_dir={out}", *RL_RUN, *overrides],
        stdout=log,
        stderr=subprocess.STDOUT,
        text=True,
        **popen,
    )


def finished(proc: subprocess.Popen, out: Path, timeout: int = 900) -> None:
    proc.wait(timeout=timeout)
    assert proc.returncode == 0, (out / "stage.log").read_text(errors="replace")[-4000:]


@pytest.fixture(scope="module")
def trained(tmp_path_factory) -> Path:
    """A run through round 1's SFT student (the cold start, then sample, filter, train)."""
    out = tmp_path_factory.mktemp("rl_run")
    finished(stage(out, "filter,train,export", 0), out)
    finished(stage(out, "sample,ground,filter,train"), out)
    return out


@pytest.fixture(scope="module")
def rl_round(trained) -> Path:
    """The round through its rl stage and export, never interrupted."""
    finished(stage(trained, "rl,export"), trained)
    return trained / "demo_cpu"


def log_lines(run: Path) -> list[dict]:
    return list(read_jsonl(run / "round_001" / "rl" / "log.jsonl"))


def test_rl_raises_the_reward_and_the_round_exports_its_policy(rl_round):
    rd = rl_round / "round_001"
    lines = log_lines(rl_round)
    assert [r["step"] for r in lines] == [1, 2, 3, 4, 5, 6]
    for r in lines:
        assert set(METRICS) <= set(r), set(METRICS) - set(r)
        # The engine sampled the trainer's policy at every step: its log-probabilities of the
        # sampled tokens equal the trainer's within the export gate's tolerance.
        assert r["logprob_diff"] <= 0.05, r
    rewards = [r["reward/reward"] for r in lines]
    print("rl rewards per step:", rewards)
    assert np.mean(rewards[3:]) > np.mean(rewards[:3]) + 0.03, rewards
    stats = read_json(rd / "stats" / "rl.json")
    assert stats["steps"] == 6 and stats["processes"] == 2 and stats["zero_stage"] == 2
    assert stats["band"] == [1, 3] and stats["band_items"] == len(read_json(rd / "rl" / "band.json")["items"])
    # The export serves the RL policy, not the SFT student RL started from.
    manifest = read_json(rd / "model" / "distill_export.json")
    assert manifest["checkpoint"] == str(rd / "rl" / "final") and manifest["gate"] == "passed"
    assert weights_hash(rd / "rl" / "final") != weights_hash(rd / "train" / "final")
    assert (rd / "STAGE").read_text().strip() == "export"
    # Every rollout keeps its lineage and reward terms.
    rows = [json.loads(line) for f in sorted((rd / "rl" / "rollouts").glob("*.jsonl")) for line in f.open()]
    assert len(rows) == 6 * 8 * 8
    assert {r["lineage"]["policy_step"] for r in rows} == set(range(6))
    assert all("reward" in r["terms"] and r["lineage"]["round"] == 1 for r in rows)


def test_a_killed_rl_stage_resumes_to_the_uninterrupted_state(trained, rl_round, tmp_path):
    # The round set back to before its rl stage, the uninterrupted stage's output kept aside.
    rd = rl_round / "round_001"
    uninterrupted = tmp_path / "rl"
    shutil.move(rd / "rl", uninterrupted)
    (rd / "STAGE").write_text("train\n")
    rl_dir = rd / "rl"
    before = len((trained / "stage.log").read_text(errors="replace"))
    first = stage(trained, "rl", 1, "rl.save_every=1", start_new_session=True)
    deadline = time.time() + 600
    while time.time() < deadline and first.poll() is None:
        log = rl_dir / "log.jsonl"
        if log.exists() and len(log.read_text().splitlines()) >= 3:
            break
        time.sleep(0.2)
    assert first.poll() is None, "the stage ended before it could be killed"
    os.killpg(first.pid, signal.SIGKILL)
    first.wait()
    assert not (rl_dir / "final").exists() and list((rl_dir / "checkpoints").glob("step-*"))
    finished(stage(trained, "rl", 1, "rl.save_every=1"), trained)
    assert "resuming from" in (trained / "stage.log").read_text(errors="replace")[before:]
    weights = load_file(rl_dir / "final" / "model.safetensors")
    reference = load_file(uninterrupted / "final" / "model.safetensors")
    assert weights.keys() == reference.keys()
    for name, value in reference.items():
        assert (weights[name] == value).all(), name
    same = ("reward/reward", "accuracy", "reasoning_tokens_mean", "loss")
    resumed = list(read_jsonl(rl_dir / "log.jsonl"))
    assert [[r[k] for k in same] for r in resumed] == [
        [r[k] for k in same] for r in read_jsonl(uninterrupted / "log.jsonl")
    ]


def test_the_grounding_reward_ranks_a_deaf_model_below_a_listening_one(trained, tmp_path):
    """Traces of the cold-start model (trained on the items' reference traces, which cite the tone)
    earn more grounding reward than traces of the same model with its audio projector zeroed."""
    run = trained / "demo_cpu"
    cfg = load_config(run / "config.yaml", ["rl.rewards={correct: 0.8, format: 0.2, grounding: 1.0}"])
    listening = run / "round_000" / "model"
    deaf = tmp_path / "deaf"
    shutil.copytree(listening, deaf)
    weights = load_file(deaf / "model.safetensors")
    save_file(
        {k: v * 0 if k.startswith("multi_modal_projector.") else v for k, v in weights.items()},
        deaf / "model.safetensors",
        metadata={"format": "pt"},
    )
    items = read_train(run)[:8]
    partners = swap_partners(read_train(run), cfg.seed)
    cache = audio_cache(cfg)
    tokenizer = load_tokenizer(str(listening))
    close = think_close_token_id(tokenizer)
    rewards = Rewards(cfg.rl, cfg.filter, control_tokens(str(listening)))
    family_of(listening)
    grounding = {}
    for name, model in (("listening", listening), ("deaf", deaf)):
        with EngineCache(cfg.engine, cfg.seed) as engines:
            llm = engines.get(model)
            push_weights(llm, load_file(model / "model.safetensors").items(), 0)
            groups = sample_groups(llm, cfg, tokenizer, items, cache, 1, 0, close, None)
            add_dependence(
                llm,
                cfg,
                tokenizer,
                groups,
                partners,
                lambda it: cache.chunks(it.audio, it.audio_sha256),
                close,
            )
        terms = [rewards(t) for g in groups for t in g.traces]
        grounding[name] = float(np.mean([t["grounding"] for t in terms]))
    print("mean grounding reward:", grounding)
    assert abs(grounding["deaf"]) < 0.01  # the audio cannot move its log-probabilities
    assert grounding["listening"] > grounding["deaf"] + 0.05


def read_train(run: Path):
    from data_pipelines.items import read_manifest

    return read_manifest(run / "data" / "train.jsonl")
