import math

import pytest

from distill.core.rundir import RunDir
from distill.report.metrics import format_table, round_record, write_run_metrics
from distill.training.optim import lr_lambda


def test_lr_schedule_warms_up_then_decays_to_a_tenth():
    f = lr_lambda(warmup=4, total=24)
    assert [f(s) for s in range(4)] == [0.25, 0.5, 0.75, 1.0]
    assert f(4) == pytest.approx(1.0)
    assert f(14) == pytest.approx(0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * 0.5)))
    assert f(24) == pytest.approx(0.1) and f(100) == pytest.approx(0.1)


def test_round_records_and_table_come_from_stage_stats(tmp_path):
    run = RunDir(tmp_path)
    r0 = run.round(0)
    r0.mark_done("filter", {"kept": 10, "seconds": 0.1})
    r0.mark_done("train", {"steps": 5, "final_loss": 0.5, "seconds": 20.0})
    r1 = run.round(1)
    r1.mark_done("sample", {"model_sha256": "abc", "seconds": 3.0})
    r1.mark_done(
        "ground",
        {
            "grounding_gap": 0.375,
            "grounding_gap_by_kind": {"silence": 0.5},
            "text_solvable_share": 0.25,
            "seconds": 0.6,
        },
    )
    r1.mark_done(
        "filter",
        {
            "traces": 16,
            "kept": 4,
            "kept_fraction": 0.25,
            "sample_accuracy": 0.5,
            "rejected_by_reason": {"answer:wrong": 10, "format:think_block": 2},
            "prompts": 4,
            "prompts_out_of_band": 1,
            "by_category": {"sound": {"kept": 4}},
            "seconds": 0.2,
            "dependence_kept": {"n": 4, "mean": 0.1, "p10": 0.0, "p50": 0.12, "p90": 0.2},
        },
    )
    records = write_run_metrics(run)
    assert [r["round"] for r in records] == [0, 1]
    assert (
        records[1]["sampled_from_sha256"] == "abc" and records[1]["rejected_by_reason"]["answer:wrong"] == 10
    )
    assert records[1]["prompts_in_band"] == 3 and records[1]["rejected_by_category"] == {"sound": {"kept": 4}}
    assert round_record(r1)["stage"] == "filter" and records[0]["train_loss"] == 0.5
    assert run.metrics.read_text().count("\n") == 2
    write_run_metrics(run)  # rebuilt, not appended
    assert run.metrics.read_text().count("\n") == 2
    table = format_table(records).splitlines()
    assert table[0].split()[:3] == ["round", "stage", "samples"]
    assert "0 (cold start)" in table[2] and "25%" in table[3] and "50.0%" in table[3]
    assert "3/4" in table[3] and "answer:wrong 62%" in table[3]
    # Grounding: the gap, the text-solvable share, the median dependence of kept traces, and the
    # grounding stage's time as a share of sampling's.
    assert records[1]["grounding_cost"] == 0.2 and records[1]["grounding_gap_by_kind"] == {"silence": 0.5}
    assert "+37.5%" in table[3] and "+0.120" in table[3] and table[0].split().index("gap") == 8
    assert records[0]["grounding_gap"] is None and records[0]["grounding_cost"] is None


def test_distribution_gives_count_mean_and_percentiles():
    from distill.core.stats import distribution

    assert distribution([]) is None
    d = distribution([float(x) for x in range(10, 0, -1)])
    assert d == {"n": 10, "mean": 5.5, "p10": 1.0, "p50": 5.0, "p90": 9.0}
    assert distribution([3.0])["p90"] == 3.0 and distribution([1.0, 2.0, 3.0])["p50"] == 2.0
