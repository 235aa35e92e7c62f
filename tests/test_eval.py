"""Eval pieces that need no engine: pass@k, majority vote, MMAU matching, the inverted-scaling
verdict, trace statistics, budget cuts, the eval config checks and the summary of judged rows."""

import pytest

from distill.config import load_config
from distill.core.schema import ConfigError
from distill.eval.scores import inverted_scaling, majority_vote, mmau_match, pass_at_k, trace_stats
from distill.eval.stage import budget_continuation, summarize
from distill.filter.answers import answer_key
from distill.rollout.engine import Completion


def test_pass_at_k_is_the_unbiased_estimate():
    assert pass_at_k(4, 0, 1) == 0.0 and pass_at_k(4, 4, 4) == 1.0
    assert pass_at_k(4, 1, 1) == pytest.approx(0.25)
    assert pass_at_k(4, 1, 2) == pytest.approx(0.5)  # 1 - C(3,2)/C(4,2) = 1 - 3/6
    assert pass_at_k(4, 1, 4) == 1.0 and pass_at_k(5, 2, 4) == 1.0  # fewer wrong samples than k
    assert pass_at_k(10, 3, 5) == pytest.approx(1 - 21 / 252)
    with pytest.raises(ValueError, match="pass@5"):
        pass_at_k(4, 1, 5)


def test_majority_vote_ignores_missing_answers_and_breaks_ties_by_first_seen():
    assert majority_vote(["option 0", "option 1", "option 1"], [True, False, False]) is False
    assert (
        majority_vote(["option 0", None, None, "option 1", "option 0"], [True, False, False, False, True])
        is True
    )
    assert majority_vote(["option 1", "option 0"], [False, True]) is False  # a tie: the first answer wins
    assert majority_vote([None, None], [False, False]) is False


def test_answer_keys_make_equivalent_answers_vote_together():
    choices = ["high", "low"]
    assert answer_key("B", "low", choices) == answer_key("it is low", "low", choices) == "option 1"
    assert answer_key("not high", "low", choices) is None  # names nothing
    assert answer_key("0.5 s", "500 ms") == answer_key("500 ms", "500 ms")
    assert (
        answer_key("Yeah", "yes") == "yes"
        and answer_key("nope", "yes") == "no"
        and answer_key("maybe", "yes") is None
    )
    assert answer_key("A Violin!", "violin") == "violin" and answer_key(None, "violin") is None


def test_mmau_match_is_the_benchmarks_string_match():
    choices = ["Man", "Woman", "Child", "Robot"]
    assert mmau_match("Woman", "The speaker is a woman.", choices)
    assert not mmau_match("Woman", "a man or a woman", choices)  # a word only a wrong option has
    assert not mmau_match("Woman", "", choices)
    # Words shared with the right option do not count against it.
    assert mmau_match(
        "Electric guitar", "an electric guitar", ["Electric guitar", "Acoustic guitar", "Piano"]
    )
    assert not mmau_match(
        "Electric guitar", "acoustic guitar", ["Electric guitar", "Acoustic guitar", "Piano"]
    )


def test_inverted_scaling_is_flagged_only_beyond_the_margin():
    assert inverted_scaling({0: 0.5, 32: 0.7, 64: 0.55}, 0.05) == {
        "from_budget": 32,
        "from_accuracy": 0.7,
        "to_budget": 64,
        "to_accuracy": 0.55,
    }
    assert inverted_scaling({0: 0.5, 32: 0.7, 64: 0.68}, 0.05) is None
    assert inverted_scaling({0: 0.5, 32: 0.6, 64: 0.7}, 0.0) is None
    assert inverted_scaling({64: 0.7}, 0.0) is None


def test_trace_stats_count_each_failure():
    ok = {"format": None, "language": None, "degeneration": None}
    traces = [
        {"reasoning_tokens": 10, "finish_reason": "stop", "checks": ok},
        {"reasoning_tokens": 30, "finish_reason": "stop", "checks": {**ok, "language": "language:script"}},
        {
            "reasoning_tokens": None,
            "finish_reason": "length",
            "checks": {**ok, "format": "format:think_block", "degeneration": "degenerate:loop"},
        },
        {"reasoning_tokens": 20, "finish_reason": "stop", "checks": ok},
    ]
    stats = trace_stats(traces)
    assert (
        stats["traces"] == 4
        and stats["reasoning_tokens"]["n"] == 3
        and stats["reasoning_tokens"]["p50"] == 20
    )
    assert stats["truncated_rate"] == stats["format_error_rate"] == stats["degeneration_rate"] == 0.25
    assert stats["language_drift_rate"] == 0.25


def test_budget_cut_keeps_the_first_tokens_and_forces_the_answer(tiny_model):
    from distill.models.tokens import load_tokenizer

    tok = load_tokenizer(str(tiny_model))
    reasoning = "the pitch is high and steady"
    ids = tok(reasoning + "</think>\nhigh", add_special_tokens=False)["input_ids"]
    close = ids.index(tok.convert_tokens_to_ids("</think>"))
    done = Completion(reasoning + "</think>\nhigh", len(ids), "stop", close, tuple(ids))
    force = "\n</think>\n"
    assert budget_continuation(done, close, tok, force) is None  # closed within the budget: its answer stands
    assert budget_continuation(done, 2, tok, force) == tok.decode(ids[:2]) + force
    assert budget_continuation(done, 0, tok, force) == force
    open_ids = tok(reasoning, add_special_tokens=False)["input_ids"]
    unclosed = Completion(reasoning, len(open_ids), "stop", None, tuple(open_ids))
    assert budget_continuation(unclosed, 1000, tok, force) == reasoning + force  # stopped early: forced whole
    # A closed trace the engine could not count (no single </think> token): counted from the text.
    uncounted = Completion(done.text, len(ids), "stop", None, tuple(ids))
    assert budget_continuation(uncounted, close, tok, force) is None
    assert budget_continuation(uncounted, close - 1, tok, force) == tok.decode(ids[: close - 1]) + force


@pytest.mark.parametrize(
    "override, message",
    [
        ("eval.budgets=[64,0]", "increasing order"),
        ("eval.budgets=[0,256]", "above eval.max_tokens"),
        ("eval.counterfactuals=[echo]", "unknown counterfactual"),
        ("eval.force_answer=Answer", "must close the reasoning"),
        ("eval.k=-1", "must be >= 0"),
        ("eval.answer_max_tokens=2000", "engine.max_model_len"),
        ("eval.benchmarks=[{name: mmau, path: /nonexistent.json}]", "no such file"),
    ],
)
def test_bad_eval_settings_fail_before_any_work(override, message):
    with pytest.raises(ConfigError, match=message):
        load_config("configs/demo_cpu.yaml", [override, "eval.temperature=0.5"])


def test_greedy_eval_with_several_samples_needs_a_temperature():
    with pytest.raises(ConfigError, match="eval.temperature=0 with eval.k=4"):
        load_config("configs/demo_cpu.yaml", ["eval.temperature=0", "eval.k=4"])


def test_summary_gives_the_curve_the_gap_and_pass_at_k():
    cfg = load_config(
        "configs/demo_cpu.yaml", ["eval.k=4", "eval.budgets=[0,32,64]", "eval.counterfactuals=[silence,swap]"]
    )
    checks = {"format": None, "language": None, "degeneration": None, "correct": None}

    def row(correct, budgets, cf, samples, category="pitch"):
        return {
            "correct": correct,
            "checks": {**checks, "correct": None if correct else "answer:wrong"},
            "num_tokens": 10,
            "reasoning_tokens": 8,
            "finish_reason": "stop",
            "family": "pitch_level",
            "category": category,
            "budgets": dict(zip(("0", "32", "64"), budgets)),
            "counterfactual": cf,
            "samples": samples,
            "majority": sum(samples) > 2,
        }

    rows = [
        row(True, (False, True, True), {"silence": False, "swap": False}, [True, True, True, False]),
        row(True, (True, True, False), {"silence": True}, [False, False, False, False], "loudness"),
        row(False, (False, False, False), {"silence": False, "swap": True}, [True, False, False, False]),
    ]
    stats = summarize(cfg, [None] * 3, rows, [])
    assert stats["accuracy"] == 0.6667 and stats["per_category"] == {"loudness": 1.0, "pitch": 0.5}
    assert stats["budgets"] == {"0": 0.3333, "32": 0.6667, "64": 0.3333}
    assert stats["inverted_scaling"]["from_budget"] == 32 and stats["inverted_scaling"]["to_budget"] == 64
    g = stats["grounding"]
    assert g["by_kind"]["silence"] == {"accuracy": 0.3333, "real_accuracy": 0.6667, "items": 3}
    assert g["by_kind"]["swap"] == {
        "accuracy": 0.5,
        "real_accuracy": 0.5,
        "items": 2,
    }  # only items with a partner
    assert (
        g["gap_by_kind"] == {"silence": 0.3333, "swap": 0.0} and g["gap"] == 0.1667
    )  # from counts, not rounded shares
    assert set(stats["pass_at"]) == {"1", "2", "4"} and stats["pass_at"]["4"] == 0.6667
    assert stats["pass_at"]["1"] == round((0.75 + 0 + 0.25) / 3, 4) and stats["majority_accuracy"] == 0.3333


def test_counterfactual_requests_are_what_they_claim(tmp_path, tiny_model):
    import numpy as np

    from distill.core.prompts import item_prompt
    from distill.core.rundir import RunDir
    from distill.eval.stage import Evaluator
    from distill.grounding.counterfactual import bank_length
    from distill.loop import init_run_dir

    cfg = load_config(
        "configs/demo_cpu.yaml",
        [
            f"output_dir={tmp_path}",
            f"model.path={tiny_model}",
            "model.build_tiny=false",
            "data.synthetic.train_items=2",
            "data.synthetic.eval_items=4",
            "eval.counterfactuals=[silence,swap]",
        ],
    )
    data = init_run_dir(cfg, RunDir(cfg.run_dir))
    ev = Evaluator(cfg, tiny_model)
    base = [ev.request(it) for it in data.eval]
    cf = ev.counterfactual_requests(data.eval, base)
    answers = [it.answer for it in data.eval]
    assert len(set(answers)) == 2  # both answers occur: every item has a partner that answers otherwise
    assert sorted(k for _, k, _ in cf) == ["silence"] * 4 + ["swap"] * 4
    step = round(cfg.grounding.bank_seconds * cfg.data.sample_rate)
    for i, kind, request in cf:
        if kind == "silence":
            assert not any(chunk.any() for chunk in request.audio)
            assert [c.size for c in request.audio] == [bank_length(c.size, step) for c in base[i].audio]
        else:  # another item's recording, one whose answer differs
            partner = [
                j
                for j, r in enumerate(base)
                if len(r.audio) == len(request.audio)
                and all(
                    a.shape == b.shape and np.array_equal(a, b)
                    for a, b in zip(r.audio, request.audio, strict=True)
                )
            ]
            assert partner and partner[0] != i and answers[partner[0]] != answers[i]
        # The same question, with one audio placeholder per chunk of the audio it now carries.
        assert (
            request.prompt
            == item_prompt(ev.tokenizer, data.eval[i], cfg.data.system_prompt, len(request.audio))
            + cfg.sample.generation_prefix
        )
