import pytest

from distill.prompting import split_trace
from distill.rewards.checks import (
    answer_matches,
    check_control_tokens,
    check_correct,
    check_finished,
    check_format,
    extract_answer,
)

GOOD = "<think>\nThe tone sits near 900 Hz, above 500 Hz.\n</think>\nhigh"


def test_split_trace():
    assert split_trace(GOOD) == ("The tone sits near 900 Hz, above 500 Hz.", "high")
    assert split_trace("high") is None
    assert split_trace("<think>a</think>b</think>c") is None
    assert split_trace("<think>a<think>b</think>c") is None
    assert split_trace("preamble <think>a</think>b") is None


@pytest.mark.parametrize(
    ("text", "reason"),
    [
        (GOOD, None),
        ("high", "format:think_block"),
        ("<think>\n\n</think>\nhigh", "format:empty_reasoning"),
        ("<think>\nreasons\n</think>\n", "format:no_answer"),
        ("<think>\nreasons that never close", "format:think_block"),
        ("<think>\n<think>\nx\n</think>\nhigh", "format:think_block"),
    ],
)
def test_check_format(text, reason):
    assert check_format(text) == reason


def test_min_reasoning_chars():
    assert check_format("<think>ab</think>high", min_reasoning_chars=3) == "format:empty_reasoning"
    assert check_format("<think>abc</think>high", min_reasoning_chars=3) is None


def test_check_finished():
    assert check_finished("length") == "truncated"
    assert check_finished("stop") is None


def test_extract_answer_takes_first_nonempty_line():
    assert extract_answer("<think>x</think>\n\n  low \nmore") == "low"
    assert extract_answer("<think>x</think>") is None
    assert extract_answer("no think") is None


@pytest.mark.parametrize(
    ("answer", "reference", "choices", "ok"),
    [
        ("high", "high", None, True),
        ("High.", "high", None, True),
        ("low", "high", None, False),
        ("A", "high", ["high", "low"], True),
        ("(b)", "low", ["high", "low"], True),
        ("B", "high", ["high", "low"], False),
        ("C", "high", ["high", "low"], False),
        ("The answer is high.", "high", ["high", "low"], True),
        ("high or low", "high", ["high", "low"], False),
        ("highest", "high", ["high", "low"], False),
    ],
)
def test_answer_matches(answer, reference, choices, ok):
    assert answer_matches(answer, reference, choices) is ok


def test_check_correct():
    assert check_correct(GOOD, "high", ["high", "low"]) is None
    assert check_correct(GOOD, "low", ["high", "low"]) == "answer:wrong"
    assert check_correct("high", "high") == "answer:missing"


def test_check_control_tokens():
    tokens = ("<|AUDIO|>", "<|im_start|>")
    assert check_control_tokens(GOOD, tokens) is None
    assert check_control_tokens("<think>x<|AUDIO|></think>high", tokens) == "control_tokens"
    assert check_control_tokens("<think>x</think>high<|im_start|>user", tokens) == "control_tokens"


def test_negation_words_as_options():
    assert answer_matches("The answer is no.", "no", ["yes", "no"])
    assert not answer_matches("no", "yes", ["yes", "no"])
    assert not answer_matches("not high", "high", ["high", "low"])
