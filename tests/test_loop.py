import pytest

from distill.config import load_config
from distill.core.rundir import RunDir
from distill.core.schema import ConfigError
from distill.core.seeds import sample_seed
from distill.core.stages import shard_plan
from distill.data import prepare_data
from distill.loop import init_run_dir, input_model


def cfg_for(tmp_path, *overrides):
    return load_config("configs/demo_cpu.yaml", [f"output_dir={tmp_path}", *overrides])


def test_resume_refuses_changed_config_but_allows_more_rounds(tmp_path, tiny_model):
    small = (f"model.path={tiny_model}", "data.synthetic.train_items=2", "data.synthetic.eval_items=2")
    cfg = cfg_for(tmp_path, *small)
    run = RunDir(cfg.run_dir)
    init_run_dir(cfg, run)
    # grounding.real_logprobs may change on resume (runs started before it defaulted to "sampled" go on).
    init_run_dir(
        cfg_for(
            tmp_path,
            *small,
            "loop.rounds=5",
            "data.audio.workers=1",
            "filter.judge.concurrency=2",
            "grounding.real_logprobs=scored",
        ),
        run,
    )
    assert "rounds: 5" in run.config.read_text()
    with pytest.raises(ConfigError, match="changed key\\(s\\): sample.n, train.learning_rate"):
        init_run_dir(cfg_for(tmp_path, *small, "sample.n=3", "train.learning_rate=0.1"), run)


def test_failed_setup_saves_no_config(tmp_path, tiny_model):
    bad = cfg_for(tmp_path, f"model.path={tmp_path}/nowhere", "model.build_tiny=false")
    run = RunDir(bad.run_dir)
    with pytest.raises(FileNotFoundError, match="nowhere: no model there"):
        init_run_dir(bad, run)
    assert not run.config.exists()
    init_run_dir(
        cfg_for(
            tmp_path,
            f"model.path={tiny_model}",
            "data.synthetic.train_items=2",
            "data.synthetic.eval_items=2",
        ),
        run,
    )  # the corrected config is accepted
    assert run.config.exists()


def test_shard_plan_from_config_and_slurm(monkeypatch, tmp_path):
    monkeypatch.delenv("SLURM_ARRAY_TASK_ID", raising=False)
    assert shard_plan(cfg_for(tmp_path, "sample.num_shards=3")) == (3, [0, 1, 2])
    assert shard_plan(cfg_for(tmp_path, "sample.num_shards=3", "sample.shard_index=1")) == (3, [1])
    monkeypatch.setenv("SLURM_ARRAY_TASK_ID", "4")
    monkeypatch.setenv("SLURM_ARRAY_TASK_COUNT", "6")
    assert shard_plan(cfg_for(tmp_path, "sample.num_shards=6")) == (6, [4])


def test_sample_seeds_are_stable_and_distinct():
    assert sample_seed(0, 1, "a", 0) == sample_seed(0, 1, "a", 0)
    seeds = {sample_seed(0, r, i, j) for r in (1, 2) for i in ("a", "b") for j in range(4)}
    assert len(seeds) == 16 and all(0 <= s < 2**31 for s in seeds)


def test_synthetic_data_written_once(tmp_path):
    cfg = cfg_for(
        tmp_path,
        "data.synthetic.train_items=4",
        "data.synthetic.eval_items=2",
        "data.synthetic.cold_start_difficulty=0",
    )
    run = RunDir(cfg.run_dir)
    data = prepare_data(cfg, run.data_dir)
    assert len(data.train) == 4 and len(data.eval) == 2 and data.cold_start is data.train
    assert not {i.id for i in data.train} & {i.id for i in data.eval}
    mtime = (run.data_dir / "train.jsonl").stat().st_mtime_ns
    prepare_data(cfg, run.data_dir)
    assert (run.data_dir / "train.jsonl").stat().st_mtime_ns == mtime


def test_round_needs_previous_export(tmp_path):
    cfg = cfg_for(tmp_path)
    run = RunDir(cfg.run_dir)
    assert str(input_model(cfg, run, 0)) == cfg.model.path
    with pytest.raises(RuntimeError, match="round 1 needs round 0's exported model"):
        input_model(cfg, run, 1)
    run.round(0).mark_done("export", {})
    assert input_model(cfg, run, 1) == run.round(0).model_dir
    assert str(input_model(cfg_for(tmp_path, "cold_start.enabled=false"), run, 1)) == cfg.model.path


def test_cli_takes_overrides_after_options(tmp_path, capsys):
    from distill.cli import main

    # A bad value in an override placed after --round must reach the config check.
    assert (
        main(
            [
                "stage",
                "sample",
                "configs/demo_cpu.yaml",
                "--round",
                "1",
                f"output_dir={tmp_path}",
                "sample.n=0",
            ]
        )
        == 2
    )
    assert "sample.n=0: must be positive" in capsys.readouterr().err


def test_slurm_array_shards(monkeypatch, tmp_path):
    monkeypatch.setenv("SLURM_ARRAY_TASK_ID", "3")
    monkeypatch.setenv("SLURM_ARRAY_TASK_MIN", "1")
    monkeypatch.setenv("SLURM_ARRAY_TASK_COUNT", "4")
    assert shard_plan(cfg_for(tmp_path, "sample.num_shards=4")) == (4, [2])
    with pytest.raises(ValueError, match="Slurm array has 4 tasks but sample.num_shards=3"):
        shard_plan(cfg_for(tmp_path, "sample.num_shards=3"))
    monkeypatch.setenv("SLURM_ARRAY_TASK_ID", "9")
    with pytest.raises(ValueError, match="outside"):
        shard_plan(cfg_for(tmp_path, "sample.num_shards=4"))


def test_stage_needs_the_previous_one(tmp_path):
    from distill.core.rundir import StageOrderError

    rd = RunDir(tmp_path).round(1)
    rd.require_before("sample")
    with pytest.raises(StageOrderError, match="stage 'train' needs 'filter' finished first"):
        rd.require_before("train")
    cold = RunDir(tmp_path).round(0)
    cold.require_before("filter")  # the cold start's first stage
    with pytest.raises(StageOrderError, match="round 0 has no 'sample' stage"):
        cold.require_before("sample")


def test_cold_start_curriculum_gets_its_own_items(tmp_path):
    cfg = cfg_for(
        tmp_path,
        "data.synthetic.train_items=4",
        "data.synthetic.eval_items=2",
        "data.synthetic.difficulty=3",
        "data.synthetic.cold_start_difficulty=1",
    )
    data = prepare_data(cfg, RunDir(cfg.run_dir).data_dir)
    assert {i.difficulty for i in data.cold_start} == {1} and {i.difficulty for i in data.train} == {3}
    assert not {i.id for i in data.cold_start} & {i.id for i in data.train}


@pytest.mark.parametrize(
    ("override", "message"),
    [
        ("data.sample_rate=8000", "data.sample_rate=8000: the model's feature extractor .* takes 16000 Hz"),
        (
            "data.audio.max_seconds=40",
            "data.audio.max_seconds=40: Qwen2-Audio .* reads at most 30 s per audio item",
        ),
        ("data.audio.long_audio=chunk", "engine.max_model_len=1024: 4 audio item\\(s\\) of up to 750 tokens"),
    ],
)
def test_audio_settings_the_model_cannot_take_fail_before_any_work(tmp_path, tiny_model, override, message):
    from distill.data import check_model_audio

    check_model_audio(cfg_for(tmp_path), tiny_model)  # the defaults fit the model
    with pytest.raises(ConfigError, match=message):
        check_model_audio(cfg_for(tmp_path, override), tiny_model)


def test_skip_solved_reads_the_previous_rounds_set_aside(tmp_path):
    from distill.core.files import atomic_write_json
    from distill.rollout.sample import solved_before

    run = RunDir(tmp_path)
    atomic_write_json(run.round(1).set_aside, {"always_failed": ["x"], "always_solved": ["a", "b"]})
    assert solved_before(run.round(2)) == {"a", "b"} and solved_before(run.round(1)) == set()
    atomic_write_json(run.round(2).set_aside, {"always_failed": [], "always_solved": ["c"]})
    assert solved_before(run.round(3)) == {"a", "b", "c"}  # skipped in round 2, still skipped in round 3


@pytest.mark.parametrize("cold_start", [True, False])
def test_student_init_continue_or_restart_from_base(tmp_path, cold_start):
    """train.init=continue trains round i's model on round i's traces; =base restarts from the
    base model on the kept traces of every round so far (ReST-EM)."""
    from pathlib import Path

    from distill.training.stage import train_inputs

    model = Path("round_model")
    cfg = cfg_for(tmp_path, f"cold_start.enabled={cold_start}")
    run = RunDir(cfg.run_dir)
    assert train_inputs(cfg, run, 3, model) == (model, [run.round(3).filtered])
    base = cfg_for(tmp_path, "train.init=base", f"cold_start.enabled={cold_start}")
    first = 0 if cold_start else 1
    assert train_inputs(base, run, 3, model) == (
        Path(base.model.path),
        [run.round(i).filtered for i in range(first, 4)],
    )
    assert train_inputs(base, run, 0, model) == (model, [run.round(0).filtered])  # the cold start itself


def test_each_job_locks_the_part_it_writes(monkeypatch, tmp_path):
    """The lock of a stage's part: a shard for an array task (from the config or the Slurm array),
    a node of multi-node training; the whole stage otherwise."""
    from distill.loop import stage_part

    for var in ("SLURM_ARRAY_TASK_ID", "SLURM_NNODES", "DISTILL_MAIN_PROCESS_IP"):
        monkeypatch.delenv(var, raising=False)
    whole = cfg_for(tmp_path, "sample.num_shards=4")
    assert [stage_part(whole, s) for s in ("sample", "ground", "filter", "train", "export", "eval")] == [
        None
    ] * 6
    one = cfg_for(tmp_path, "sample.num_shards=4", "sample.shard_index=2")
    assert stage_part(one, "sample") == stage_part(one, "ground") == "shard-00002-of-00004"
    assert stage_part(cfg_for(tmp_path, "sample.num_shards=1", "sample.shard_index=0"), "sample") is None
    monkeypatch.setenv("SLURM_ARRAY_TASK_ID", "1")
    monkeypatch.setenv("SLURM_ARRAY_TASK_COUNT", "4")
    assert stage_part(whole, "sample") == "shard-00001-of-00004"
    monkeypatch.setenv("SLURM_NNODES", "2")
    monkeypatch.setenv("SLURM_NODEID", "1")
    monkeypatch.setenv("DISTILL_MAIN_PROCESS_IP", "127.0.0.1")
    monkeypatch.setenv("DISTILL_MAIN_PROCESS_PORT", "29500")
    assert stage_part(whole, "train") == "node-1-of-2" and stage_part(whole, "export") is None
