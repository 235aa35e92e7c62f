"""Answer extraction and matching edge cases."""

import pytest

from distill.filter.answers import (
    Tolerance,
    answer_kind,
    answer_matches,
    extract_answer,
    load_verifier,
    parse_number,
)


@pytest.mark.parametrize(
    ("answer", "reference", "choices", "ok"),
    [
        # multiple choice: option text, letter, phrasing that names one option, negation
        ("violin", "violin", ["piano", "violin"], True),
        ("B", "violin", ["piano", "violin"], True),
        ("(b).", "violin", ["piano", "violin"], True),
        ("C", "violin", ["piano", "violin"], False),
        ("It is a violin.", "violin", ["piano", "violin"], True),
        ("piano or violin", "violin", ["piano", "violin"], False),
        ("not the piano", "violin", ["piano", "violin"], False),
        ("The Violin", "violin", ["piano", "violin"], True),
        # yes / no
        ("Yes, it does.", "yes", None, True),
        ("yeah", "yes", None, True),
        ("No.", "yes", None, False),
        ("maybe", "no", None, False),
        ("false", "no", None, True),
        # numbers, with units converted and words read
        ("3", "3", None, True),
        ("3.0", "3", None, True),
        ("three", "3", None, True),
        ("There are 4 beeps.", "3", None, False),
        ("500 ms", "0.5 s", None, True),
        ("0.5 s", "500 ms", None, True),
        ("1.2 kHz", "1200 Hz", None, True),
        ("440 ms", "440 Hz", None, False),
        ("1,200 Hz", "1200 Hz", None, True),
        ("no number here", "3", None, False),
        # free text: normalized exact match
        ("A dog barking!", "dog barking", None, True),
        ("dog barks", "dog barking", None, False),
        # lead-ins are not the answer
        ("Answer: Yes", "yes", None, True),
        ("Answer: B", "low", ["high", "low"], True),
        ("The final answer is: dog barking", "dog barking", None, True),
        # commas, hyphens and bare numbers against a unit
        ("2,3", "23", None, False),
        ("0,5", "5", None, False),
        ("C-3", "-3", None, False),
        ("-3 dB", "-3 dB", None, True),
        ("500", "500 ms", None, True),
        ("2 minutes", "120 s", None, True),
    ],
)
def test_answer_matches(answer, reference, choices, ok):
    assert answer_matches(answer, reference, choices) is ok


def test_number_tolerance():
    assert not answer_matches("445 Hz", "440 Hz")
    assert answer_matches("445 Hz", "440 Hz", tol=Tolerance(rel_tol=0.02))
    assert answer_matches("3.4", "3", tol=Tolerance(abs_tol=0.5))
    assert not answer_matches("3.6", "3", tol=Tolerance(abs_tol=0.5))


def test_answer_kinds():
    assert answer_kind("high", ["high", "low"]) == "choice"
    assert answer_kind("Yes", None) == "yes_no"
    assert answer_kind("440 Hz", None) == "number" and answer_kind("seven", None) == "number"
    assert answer_kind("a violin", None) == "text" and answer_kind("3 violins", None) == "text"
    q = parse_number("about 2.5 seconds")
    assert (q.value, q.dimension) == (2.5, "s") and parse_number("none") is None
    assert parse_number("500 ms").base == 0.5 and parse_number("1,200 Hz").value == 1200


def test_extract_answer_line_and_tag():
    assert extract_answer("<think>x</think>\n\n  low \nmore") == "low"
    assert extract_answer("<think>x</think>") is None
    assert extract_answer("no think") is None
    tagged = "<think>x</think>\nSo: <answer> high </answer> done"
    assert extract_answer(tagged, tag="answer") == "high"
    assert extract_answer("<think>x</think>\nhigh", tag="answer") is None
    assert extract_answer("<think>x</think>\n<answer></answer>", tag="answer") is None


def _never(answer, reference, trace):
    return False


def test_custom_verifier_by_import_path():
    fn = load_verifier("tests.test_answers:_never")
    assert fn("a", "a", {}) is False
    with pytest.raises(ValueError, match="expected 'package.module:function'"):
        load_verifier("tests.test_answers")
    with pytest.raises(ValueError, match="cannot import it"):
        load_verifier("tests.nowhere:f")


def test_option_patterns_are_built_once_per_choice_list():
    from distill.filter.answers import option_patterns

    # The filter asks the same few choice lists for every trace: compiling them each time cost a
    # third of the rule pipeline's time (bench/filter_checks.py).
    assert option_patterns(("high", "low")) is option_patterns(("high", "low"))
