"""Selection per prompt: pass-rate band, keep policies, near-duplicates."""

from distill.filter.selection import jaccard, select, shingles

BASE = "the first tone is near {} hertz and the second near {} hertz so the second is higher"


def test_pass_rate_band_drops_whole_prompts():
    texts = ["a", "b", "c", "d"]
    inside = select(texts, [0, 1], correct=2, total=4, keep=4, policy="first", band=(0.25, 0.75), near_duplicate=0.8)
    assert inside.kept == [0, 1] and inside.in_band
    solved = select(texts, [0, 1, 2, 3], correct=4, total=4, keep=4, policy="first", band=(0.25, 0.75),
                    near_duplicate=0.8)
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
