"""Slurm submission without a cluster: what the plan submits given the run directory and the
queue, the scripts it writes, the multi-node training command, the dry run."""

import subprocess
import sys
from pathlib import Path

import pytest

from distill.config import load_config
from distill.core.files import atomic_write_text
from distill.core.rundir import RunDir
from distill.core.schema import ConfigError
from distill.slurm import Job, Queued, describe, plan, render, sbatch_args, script
from distill.training.launch import Machines, machines_from_env, train_command

SHARDS = 3


def config(tmp_path, *overrides):
    return load_config(
        "configs/demo_cpu.yaml", [f"output_dir={tmp_path}", f"sample.num_shards={SHARDS}", *overrides]
    )


def finish(rd, *stages):
    for stage in stages:
        rd.mark_done(stage, {"seconds": 1.0})


ROUND0 = ("filter", "train", "export", "eval")
ALL = ("sample", "ground", "filter", "train", "export", "eval")


def test_a_fresh_run_chains_every_job_of_every_round(tmp_path):
    cfg = config(tmp_path)
    jobs = plan(cfg, RunDir(cfg.run_dir), 2, {}).jobs
    assert [j.key for j in jobs] == [
        "r000-filter",
        "r000-train",
        "r000-eval",
        "r001-sample",
        "r001-ground",
        "r001-filter",
        "r001-train",
        "r001-eval",
        "r002-sample",
        "r002-ground",
        "r002-filter",
        "r002-train",
        "r002-eval",
    ]
    assert [j.after_ok for j in jobs[:5]] == [
        [],
        ["r000-filter"],
        ["r000-train"],
        ["r000-eval"],
        ["r001-sample"],
    ]
    assert jobs[3].shards == jobs[4].shards == [0, 1, 2] and jobs[3].stages == ["sample"]
    assert jobs[2].stages == ["export", "eval"] and jobs[5].shards is None


def test_without_grounding_the_filter_job_runs_the_ground_stage(tmp_path):
    cfg = config(tmp_path, "grounding.enabled=false", "cold_start.enabled=false")
    jobs = plan(cfg, RunDir(cfg.run_dir), 1, {}).jobs
    assert [(j.kind, j.stages) for j in jobs] == [
        ("sample", ["sample"]),
        ("filter", ["ground", "filter"]),
        ("train", ["train"]),
        ("eval", ["rl", "export", "eval"]),  # RL is off: its marker runs in the next job
    ]
    assert jobs[0].shards == [0, 1, 2] and jobs[1].shards is None  # the turned-off ground shards nothing


def test_rl_runs_in_the_training_job_on_its_nodes(tmp_path):
    cfg = config(tmp_path, "rl.enabled=true", "cold_start.enabled=false", "slurm.train_nodes=2")
    jobs = plan(cfg, RunDir(cfg.run_dir), 1, {}).jobs
    assert [(j.kind, j.stages) for j in jobs] == [
        ("sample", ["sample"]),
        ("ground", ["ground"]),
        ("filter", ["filter"]),
        ("train", ["train", "rl"]),
        ("eval", ["export", "eval"]),
    ]
    assert "--nodes=2" in script(cfg, RunDir(cfg.run_dir), jobs[3])


def test_resubmission_asks_only_for_what_is_missing(tmp_path):
    cfg = config(tmp_path)
    run = RunDir(cfg.run_dir)
    finish(run.round(0), *ROUND0)
    rd = run.round(1)
    for shard in (0, 2):  # shard 1's array task failed
        atomic_write_text(rd.shard_path(shard, SHARDS), "{}\n")
    jobs = plan(cfg, run, 1, {}).jobs
    assert jobs[0].key == "r001-sample" and jobs[0].shards == [1] and jobs[0].after_ok == []
    assert [j.key for j in jobs] == ["r001-sample", "r001-ground", "r001-filter", "r001-train", "r001-eval"]
    # Every shard on disk but the stage unmarked: one task marks it, sampling nothing.
    atomic_write_text(rd.shard_path(1, SHARDS), "{}\n")
    assert plan(cfg, run, 1, {}).jobs[0].shards == [0]
    # A finished run submits nothing.
    finish(rd, *ALL)
    assert plan(cfg, run, 1, {}).jobs == []


def test_queued_jobs_are_waited_for_unless_a_job_before_them_is_replaced(tmp_path):
    cfg = config(tmp_path)
    run = RunDir(cfg.run_dir)
    finish(run.round(0), *ROUND0)
    # Tasks 0 and 2 of an earlier array are still queued or running; task 1 failed.
    queued = {"r001-sample": [Queued("41", {0, 2})], "r001-train": [Queued("44", None)]}
    planned = plan(cfg, run, 1, queued)
    sample, ground = planned.jobs[0], planned.jobs[1]
    assert sample.shards == [1] and ground.after_ok == ["r001-sample"] and ground.after_any == ["41"]
    # The queued training job waits for a chain that is being replaced: it is cancelled and replanned.
    assert [j.key for j in planned.jobs] == [
        "r001-sample",
        "r001-ground",
        "r001-filter",
        "r001-train",
        "r001-eval",
    ]
    assert planned.cancel == ["44"]
    # Every missing shard covered by live tasks: no new array, the grounding waits for the old one.
    planned = plan(cfg, run, 1, {"r001-sample": [Queued("41", {0, 1, 2})]})
    assert planned.jobs[0].key == "r001-ground" and planned.jobs[0].after_ok == []
    assert planned.jobs[0].after_any == ["41"] and planned.cancel == []
    # Nothing before it is new: a queued job stands for its kind, and the next job waits for its id.
    finish(run.round(1), "sample", "ground", "filter")
    planned = plan(cfg, run, 1, {"r001-train": [Queued("44", None)]})
    assert [j.key for j in planned.jobs] == ["r001-eval"] and planned.jobs[0].after_ok == ["44"]
    assert planned.cancel == []


def test_sbatch_options_and_dependencies(tmp_path):
    cfg = config(tmp_path, "slurm.array_parallel=2")
    job = Job(1, "ground", ["ground"], [1, 2], after_ok=["r001-sample"], after_any=["41"])
    assert sbatch_args(cfg, job, {"r001-sample": "57"}) == [
        "--parsable",
        "--array=1,2%2",
        "--dependency=afterok:57,afterany:41",
    ]
    assert describe(job) == "r001-ground: ground shards 1,2 after afterok:r001-sample, afterany:41"


def test_scripts_carry_the_config_and_the_job_shape(tmp_path):
    cfg = config(
        tmp_path,
        "slurm.partition=gpu",
        "slurm.account=audio",
        "slurm.gpus_per_node=8",
        "slurm.train_nodes=2",
        "train.num_processes=16",
        "slurm.setup=[source .venv/bin/activate]",
        "slurm.extra_args=[--exclusive]",
        "slurm.time_train=2-00:00:00",
    )
    run = RunDir(cfg.run_dir)
    sample = script(cfg, run, Job(1, "sample", ["sample"], [0, 2]))
    # A vLLM engine runs on one GPU; training takes every GPU of its nodes.
    assert "#SBATCH --partition=gpu" in sample and "#SBATCH --gpus-per-node=1" in sample
    assert "#SBATCH --exclusive" in sample and "source .venv/bin/activate" in sample
    assert "stage sample " in sample and "--round 1 sample.shard_index=$SLURM_ARRAY_TASK_ID" in sample
    assert "%x-%A_%a.out" in sample and str(run.config.resolve()) in sample
    train = script(cfg, run, Job(1, "train", ["train"]))
    assert "#SBATCH --nodes=2" in train and "#SBATCH --time=2-00:00:00" in train
    assert "#SBATCH --gpus-per-node=8" in train
    assert (
        'srun --ntasks-per-node=1 --cpus-per-task="$SLURM_CPUS_PER_TASK" --kill-on-bad-exit=1' in train
        and "DISTILL_MAIN_PROCESS_IP" in train
    )
    # The filter needs no GPU; export + eval run in one job (one engine).
    filt = script(cfg, run, Job(1, "filter", ["filter"]))
    assert "--gpus-per-node" not in filt
    assert "stage export,eval " in script(cfg, run, Job(1, "eval", ["export", "eval"]))


def test_a_template_field_distill_does_not_know_fails(tmp_path):
    with pytest.raises(ValueError, match=r"custom.sbatch: unknown template field\(s\) nodez"):
        render("#SBATCH --nodes={{nodez}}", {"nodes": "2"}, Path("custom.sbatch"))


@pytest.mark.parametrize(
    "override, message",
    [
        ("slurm.time_train=forever", "not a Slurm time limit"),
        ("slurm.train_nodes=3", "must be a multiple of slurm.train_nodes=3"),
        ("slurm.extra_args=[exclusive]", "not an sbatch option"),
        ("slurm.template_dir=/nonexistent", "no such folder"),
    ],
)
def test_bad_slurm_settings_fail_before_any_work(tmp_path, override, message):
    with pytest.raises(ConfigError, match=message):
        config(tmp_path, override)


def test_multi_node_training_command_from_the_job_environment(tmp_path):
    env = {
        "SLURM_NNODES": "2",
        "SLURM_NODEID": "1",
        "DISTILL_MAIN_PROCESS_IP": "node-a",
        "DISTILL_MAIN_PROCESS_PORT": "29512",
    }
    machines = machines_from_env(env)
    assert machines == Machines(2, 1, "node-a", 29512)
    assert machines_from_env({"SLURM_NNODES": "2"}) == Machines()  # not a distill training job script
    tcfg = config(tmp_path, "train.num_processes=16").train
    cmd = train_command(tcfg, Path("c.yaml"), [Path("f.jsonl")], Path("m"), Path("o"), "train", machines)
    line = " ".join(cmd)
    assert (
        "--num_processes 16 --num_machines 2" in line
        and "--machine_rank 1 --main_process_ip node-a --main_process_port 29512" in line
        and "--deepspeed_multinode_launcher standard" in line
    )
    with pytest.raises(ValueError, match="does not split evenly over 3 nodes"):
        train_command(tcfg, Path("c.yaml"), [], Path("m"), Path("o"), "train", Machines(3, 0, "a", 1))


def test_dry_run_prints_the_plan_and_submits_nothing(tmp_path):
    done = subprocess.run(
        [
            sys.executable,
            "-m",
            "distill.cli",
            "slurm",
            "submit",
            "configs/demo_cpu.yaml",
            "--rounds",
            "1",
            "--dry-run",
            f"output_dir={tmp_path}",
            "data.synthetic.train_items=4",
            "data.synthetic.eval_items=2",
            "cold_start.enabled=false",
        ],
        capture_output=True,
        text=True,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    assert (
        "# r001-sample: sample shards 0,1,2,3" in done.stdout
        and "#SBATCH --job-name=distill-demo_cpu-r001-train" in done.stdout
    )
    assert "# sbatch --parsable --dependency=afterok:r001-train r001-eval.sbatch" in done.stdout
    assert not (tmp_path / "demo_cpu").exists()  # a dry run writes nothing: no data, no config, no jobs


def test_stage_takes_several_stages_in_order():
    from distill.cli import build_parser

    args = build_parser().parse_args(["stage", "export,eval", "c.yaml", "--round", "1"])
    assert args.stage == ["export", "eval"]
    with pytest.raises(SystemExit):
        build_parser().parse_args(["stage", "export,evaluate", "c.yaml", "--round", "1"])
