import pytest

from distill.core.rundir import RoundDir, RunDir


def test_stage_markers_order(tmp_path):
    rd = RunDir(tmp_path).round(1)
    assert rd.last_stage() is None and not rd.is_done("sample")
    rd.mark_done("sample", {"n": 3})
    assert rd.is_done("sample") and not rd.is_done("filter")
    rd.mark_done("filter", {"kept": 2})
    assert rd.is_done("sample") and rd.is_done("filter") and not rd.is_done("train")
    assert rd.stats() == {"sample": {"n": 3}, "filter": {"kept": 2}}


def test_stats_written_before_marker(tmp_path, monkeypatch):
    import distill.core.rundir

    rd = RoundDir(tmp_path, 2)

    def crash(*_):
        raise OSError("disk full")

    monkeypatch.setattr(distill.core.rundir, "atomic_write_text", crash)
    with pytest.raises(OSError):
        rd.mark_done("sample", {"x": 1})
    # The crash hit the marker: the stats are there, the stage does not count as done.
    assert (rd.stats_dir / "sample.json").exists() and not rd.is_done("sample")


def test_unknown_marker_is_an_error(tmp_path):
    rd = RoundDir(tmp_path, 1)
    rd.path.mkdir()
    rd.stage_file.write_text("bake\n")
    with pytest.raises(ValueError, match="STAGE: unknown stage 'bake'"):
        rd.is_done("sample")


def test_rounds_listed_in_order(tmp_path):
    run = RunDir(tmp_path)
    for i in (2, 0, 1):
        run.round(i).path.mkdir()
    (tmp_path / "round_x").mkdir()
    assert [r.index for r in run.rounds()] == [0, 1, 2]
    assert run.round(3).shard_path(7, 8).name == "shard-00007-of-00008.jsonl"


def test_a_stale_shard_is_refused_naming_the_field(tmp_path):
    """Sample and grounding shards on disk must come from the round's model (and a grounding shard
    from the sample shard on disk now); an empty shard holds nothing stale."""
    import pytest

    from distill.core.files import atomic_write_jsonl
    from distill.core.rows import check_shard_inputs

    path = tmp_path / "shard-00000-of-00001.jsonl"
    atomic_write_jsonl(path, [{"lineage": {"model_sha256": "a" * 64}, "samples_sha256": None}])
    check_shard_inputs(path, {"lineage.model_sha256": "a" * 64, "samples_sha256": None}, "redo")
    stale = r"stale: written with lineage.model_sha256 a+, .* b+ now; redo it"
    with pytest.raises(RuntimeError, match=stale):
        check_shard_inputs(path, {"lineage.model_sha256": "b" * 64}, "redo it")
    with pytest.raises(RuntimeError, match="samples_sha256 None"):
        check_shard_inputs(path, {"samples_sha256": "c" * 64}, "redo")
    atomic_write_jsonl(path, [])
    check_shard_inputs(path, {"lineage.model_sha256": "b" * 64}, "redo")
