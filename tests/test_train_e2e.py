"""`accelerate launch distill/train.py` for real: DeepSpeed ZeRO on 2 gloo ranks, the tiny model."""

import subprocess
import time
from pathlib import Path

import psutil
import pytest
import torch
from safetensors.torch import load_file

from data_pipelines.synthetic import generate_split
from distill.config import load_config, to_yaml
from distill.core.files import atomic_write_jsonl, read_json, read_jsonl
from distill.data import audio_cache
from distill.filter.cold_start import cold_start_rows
from distill.models.tokens import load_tokenizer
from distill.training.launch import train_command, train_env

# The module shares its data fixture: its tests run in one test process (scripts/dev.sh: --dist loadgroup).
pytestmark = [pytest.mark.e2e, pytest.mark.xdist_group("train_e2e")]


@pytest.fixture(scope="module")
def setup(tiny_model, tmp_path_factory) -> tuple[Path, Path]:
    """A run config and 24 SFT rows of varied lengths (two traces per item, as kept traces are)."""
    tmp = tmp_path_factory.mktemp("train")
    cfg = load_config(
        "configs/demo_cpu.yaml",
        [
            f"output_dir={tmp}",
            f"model.path={tiny_model}",
            "train.micro_batch_size=4",
            "train.epochs=2",
            "train.warmup_steps=1",
        ],
    )
    config = tmp / "config.yaml"
    config.write_text(to_yaml(cfg))
    items = generate_split(tmp, "train", ["pitch_level", "higher_of_two"], 12, 0, 1, 16000)
    rows = cold_start_rows(items, load_tokenizer(str(tiny_model)), cfg.data.system_prompt, audio_cache(cfg))
    traces = [
        {**r, "completion": r["completion"].replace("\n</think>", " The tone is steady." * k + "\n</think>")}
        for k, r in enumerate(rows + rows)
    ]
    data = tmp / "kept.jsonl"
    atomic_write_jsonl(data, traces)
    return config, data


def start(setup, tiny_model, out: Path, *overrides: str) -> subprocess.Popen:
    config, data = setup
    tcfg = load_config(config, list(overrides)).train
    cmd = train_command(tcfg, config, [data], tiny_model, out, "train") + list(overrides)
    out.mkdir(parents=True, exist_ok=True)
    log = (out.parent / f"{out.name}.log").open("a")
    return subprocess.Popen(
        cmd, env=train_env(tcfg), stdout=log, stderr=subprocess.STDOUT, start_new_session=True
    )


def train(setup, tiny_model, out: Path, *overrides: str) -> dict:
    proc = start(setup, tiny_model, out, *overrides)
    assert proc.wait(timeout=300) == 0, (out.parent / f"{out.name}.log").read_text()[-3000:]
    return read_json(out / "final" / "train_summary.json")


def test_resume_after_a_kill_equals_the_uninterrupted_run(setup, tiny_model, tmp_path):
    """Killed after its first saved state, the stage resumes from it and ends with the very
    weights and losses of a run that was never interrupted: the batch position, the optimizer and
    schedule, and every rank's RNG (LoRA dropout draws from it) come back."""
    knobs = (
        "train.save_steps=2",
        "train.grad_accum=2",
        "train.epochs=3",
        "train.lora.enabled=true",
        "train.lora.dropout=0.1",
    )
    whole = train(setup, tiny_model, tmp_path / "whole", *knobs)
    assert whole["steps"] == 6 and whole["processes"] == 2 and whole["zero_stage"] == 2 and whole["lora"]
    assert not (tmp_path / "whole" / "checkpoints").exists()  # the final checkpoint replaces them

    cut = tmp_path / "cut"
    proc = start(setup, tiny_model, cut, *knobs)
    deadline = time.time() + 240
    while (
        not list(cut.glob("checkpoints/step-*/progress.json"))
        and proc.poll() is None
        and time.time() < deadline
    ):
        time.sleep(0.05)
    # torchrun starts its workers in their own process groups: kill the whole tree.
    tree = psutil.Process(proc.pid).children(recursive=True) + [psutil.Process(proc.pid)]
    for p in tree:
        p.kill()
    proc.wait()
    assert not (cut / "final").exists(), "the run finished before it could be interrupted"
    resumed = train(setup, tiny_model, cut, *knobs)
    assert resumed["resumed_from_step"] in (2, 4)

    a, b = (
        load_file(tmp_path / "whole" / "final" / "model.safetensors"),
        load_file(cut / "final" / "model.safetensors"),
    )
    assert a.keys() == b.keys()
    assert all(torch.equal(a[k], b[k]) for k in a), [k for k in a if not torch.equal(a[k], b[k])]

    def losses(path):  # what was trained, not how long it took (elapsed_s is wall-clock time)
        return [{k: v for k, v in row.items() if k != "elapsed_s"} for row in read_jsonl(path)]

    assert losses(tmp_path / "whole" / "log.jsonl") == losses(cut / "log.jsonl")
    # A saved state belongs to its plan: resuming it with another batch size is refused.
    (cut / "final").rename(cut / "done")
    (cut / "checkpoints" / "step-00000002").mkdir(parents=True)
    (cut / "checkpoints" / "step-00000002" / "progress.json").write_text('{"step": 2, "micro_batch_size": 4}')
    proc = start(setup, tiny_model, cut, *knobs)
    assert (
        proc.wait(timeout=300) != 0
        and "saved under another training plan" in (tmp_path / "cut.log").read_text()
    )


def test_frozen_encoder_is_saved_unchanged_with_the_optimizer_offloaded(setup, tiny_model, tmp_path):
    """The default trains the projector and the language model; the audio encoder's weights come
    out bit for bit as they went in (ZeRO-2 gathers and saves every weight). The optimizer state
    lives in CPU memory here: DeepSpeed's CPU Adam (its op is compiled on first use)."""
    summary = train(setup, tiny_model, tmp_path / "run", "train.max_steps=2", "train.offload_optimizer=true")
    assert summary["optimizer"] == "DeepSpeedCPUAdam" and summary["steps"] == 2
    before, after = (
        load_file(tiny_model / "model.safetensors"),
        load_file(tmp_path / "run" / "final" / "model.safetensors"),
    )
    encoder = [k for k in before if k.startswith("audio_tower.")]
    assert encoder and all(torch.equal(before[k], after[k]) for k in encoder)
    assert not torch.equal(
        before["multi_modal_projector.linear.weight"], after["multi_modal_projector.linear.weight"]
    )
    assert not torch.equal(before["language_model.lm_head.weight"], after["language_model.lm_head.weight"])


def test_a_rank_whose_peer_hangs_exits_with_a_message(setup, tiny_model, tmp_path):
    """A rank whose peer stops answering (here: SIGSTOPped, as a hung node would be) gives up after
    train.collective_timeout_s with a message, instead of blocking for ever."""
    out = tmp_path / "hang"
    proc = start(setup, tiny_model, out, "train.epochs=50", "train.collective_timeout_s=15")
    log = tmp_path / "hang.log"
    deadline = time.time() + 240
    while not ((out / "log.jsonl").exists() and (out / "log.jsonl").read_text()) and time.time() < deadline:
        assert proc.poll() is None, log.read_text()[-3000:]
        time.sleep(0.05)
    ranks = {
        p.environ().get("RANK"): p
        for p in psutil.Process(proc.pid).children(recursive=True)
        if "train.py" in " ".join(p.cmdline())
    }
    message = "train: rank 0 lost contact with the other ranks and stops: "
    try:
        ranks["1"].suspend()
        stopped = time.time()
        while message not in log.read_text():
            assert time.time() - stopped < 60, log.read_text()[-3000:]
            time.sleep(0.1)
        print(f"rank 0 gave up {time.time() - stopped:.1f} s after rank 1 stopped")
        assert psutil.wait_procs([ranks["0"]], timeout=10)[0], "rank 0 did not exit after its message"
        ranks["1"].kill()  # torchrun would give the stopped rank 30 s to end on SIGTERM first
        assert proc.wait(timeout=60) != 0
        text = log.read_text()
        assert "Timed out" in text and "train.collective_timeout_s" in text
    finally:
        for p in ranks.values():
            try:
                p.kill()
            except psutil.Error:
                pass
