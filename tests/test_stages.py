"""The stage registry (distill/core/stages.py): every entry runs, reads what earlier stages wrote,
and names config keys that exist."""

import inspect

import pytest

from distill.config import Config, SlurmConfig
from distill.core.stages import STAGE_NAMES, STAGES, round_stages, stage_named


@pytest.mark.parametrize("stage", STAGES, ids=lambda s: s.name)
def test_every_stage_resolves_to_a_run_of_its_context(stage):
    function = stage.function()
    assert callable(function) and list(inspect.signature(function).parameters) == ["ctx"]
    assert function.__module__ == stage.run.partition(":")[0]


def test_each_stage_reads_what_an_earlier_stage_writes():
    written: set[str] = set()
    for stage in STAGES:
        missing = [r for r in stage.reads if not r.startswith("../") and not r.startswith(tuple(written))]
        assert not missing, f"{stage.name} reads {missing}, which no earlier stage writes"
        written.update(stage.writes)


def test_the_config_keys_a_stage_names_exist():
    for stage in STAGES:
        if stage.enabled_by:
            section, _, key = stage.enabled_by.partition(".")
            assert key in Config.__dataclass_fields__[section].default_factory().__dataclass_fields__
        if stage.slurm_time:
            assert stage.slurm_time in SlurmConfig.__dataclass_fields__
        assert stage.progress in ("", "shards", "steps") and (stage.progress != "shards" or stage.sharded)


def test_round_zero_is_the_cold_start_and_names_are_checked():
    assert [s.name for s in round_stages(0)] == ["filter", "train", "export", "eval"]
    assert tuple(s.name for s in round_stages(1)) == STAGE_NAMES
    with pytest.raises(ValueError, match="unknown stage 'distil'"):
        stage_named("distil")
