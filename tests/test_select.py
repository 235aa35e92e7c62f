"""Selection per prompt: pass-rate band, keep policies, near-duplicates."""

from distill.filter.config import FilterConfig
from distill.filter.selection import (
    dependence_result,
    grounded_results,
    item_decision,
    jaccard,
    select,
    shingles,
)
from distill.grounding.config import GroundingConfig

BASE = "the first tone is near {} hertz and the second near {} hertz so the second is higher"


def test_pass_rate_band_drops_whole_prompts():
    texts = ["a", "b", "c", "d"]
    inside = select(
        texts, [0, 1], correct=2, total=4, keep=4, policy="first", band=(0.25, 0.75), near_duplicate=0.8
    )
    assert inside.kept == [0, 1] and inside.in_band
    solved = select(
        texts, [0, 1, 2, 3], correct=4, total=4, keep=4, policy="first", band=(0.25, 0.75), near_duplicate=0.8
    )
    assert solved.kept == [] and not solved.in_band
    assert solved.dropped == dict.fromkeys(range(4), "prompt:pass_rate")


def test_keep_policies():
    texts = ["x" * 30, "x" * 10, "x" * 20]
    first = select(texts, [0, 1, 2], 3, 3, keep=2, policy="first", band=(0, 1), near_duplicate=0.8)
    assert first.kept == [0, 1] and first.dropped == {2: "over_keep_per_prompt"}
    short = select(texts, [0, 1, 2], 3, 3, keep=2, policy="shortest", band=(0, 1), near_duplicate=0.8)
    assert short.kept == [1, 2] and short.dropped == {0: "over_keep_per_prompt"}


def test_diverse_removes_near_duplicates_then_spreads():
    a = BASE.format(300, 600)
    a_again = BASE.format(300, 600) + " indeed"
    b = BASE.format(310, 610)
    c = "two onsets a long gap then a burst of broadband noise so the tone came first clearly"
    assert jaccard(shingles(a), shingles(a_again)) >= 0.8 > jaccard(shingles(a), shingles(b))
    texts = [a, a_again, b, c]
    decision = select(texts, [0, 1, 2, 3], 4, 4, keep=2, policy="diverse", band=(0, 1), near_duplicate=0.8)
    assert decision.dropped[1] == "near_duplicate"
    assert decision.kept == [0, 3]  # c differs most from a; b is a's close cousin
    assert decision.dropped[2] == "over_keep_per_prompt"


def test_item_decision_indexes_traces_in_sample_order():
    """The ground stage and the filter hand an item's traces in different orders; both must get one
    decision, with indices into the traces sorted by sample index."""
    fc = FilterConfig(keep_per_prompt=1, keep_policy="first", pass_rate_min=0.0, pass_rate_max=1.0)
    traces = [{"trace_id": f"t{i}", "sample_index": i, "completion": f"text {i}"} for i in (2, 0, 1)]
    results = {"t0": {"correct": "wrong"}, "t1": {"correct": None}, "t2": {"correct": None}}
    ordered, decision, correct = item_decision(fc, traces, results, graded=True)
    assert [t["trace_id"] for t in ordered] == ["t0", "t1", "t2"]
    assert correct == 2 and decision.kept == [1] and decision.dropped == {2: "over_keep_per_prompt"}
    assert item_decision(fc, list(reversed(traces)), results, graded=True)[1] == decision


def test_grounded_results_and_dependence():
    rules = {"format": None, "correct": None}
    drop, down = GroundingConfig(text_solvable="drop"), GroundingConfig(text_solvable="downweight")
    assert grounded_results(rules, True, drop) == {
        **rules,
        "text_solvable": "grounding:text_solvable",
        "audio_dependence": None,
    }
    assert grounded_results(rules, True, down)["text_solvable"] is None
    assert grounded_results(rules, False, drop)["text_solvable"] is None
    g = GroundingConfig(min_dependence=0.05, min_answer_dependence=None)
    assert dependence_result(None, g) == "grounding:unscored"
    assert dependence_result({"dependence": 0.01}, g) == "grounding:audio_independent"
    assert dependence_result({"dependence": 0.2}, g) is None
