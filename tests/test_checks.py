import pytest

from distill.core.prompts import split_trace
from distill.filter.answers import answer_matches, extract_answer
from distill.filter.checks import check_control_tokens, check_correct, check_finished, check_format

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
    assert check_format(split_trace(text)) == reason


def test_min_reasoning_chars():
    assert (
        check_format(split_trace("<think>ab</think>high"), min_reasoning_chars=3) == "format:empty_reasoning"
    )
    assert check_format(split_trace("<think>abc</think>high"), min_reasoning_chars=3) is None


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
    assert check_correct(extract_answer(GOOD), "high", ["high", "low"]) is None
    assert check_correct(extract_answer(GOOD), "low", ["high", "low"]) == "answer:wrong"
    assert check_correct(extract_answer("high"), "high") == "answer:missing"


def test_check_control_tokens():
    tokens = ("<|AUDIO|>", "<|im_start|>")
    assert check_control_tokens(GOOD, tokens) is None
    assert check_control_tokens("<think>x<|AUDIO|></think>high", tokens) == "control_tokens"
    assert check_control_tokens("<think>x</think>high<|im_start|>user", tokens) == "control_tokens"


def test_negation_words_as_options():
    assert answer_matches("The answer is no.", "no", ["yes", "no"])
    assert not answer_matches("no", "yes", ["yes", "no"])
    assert not answer_matches("not high", "high", ["high", "low"])


def test_check_length():
    from distill.filter.checks import check_length

    assert check_length(50, 10, 100) is None
    assert check_length(5, 10, 100) == "length:short"
    assert check_length(101, 10, 100) == "length:long"
    assert check_length(10_000, 10, 0) is None  # no cap
    assert check_length(None, 10, 100) is None  # no think block: the format check's business


def test_check_language_allows_the_question_scripts():
    from distill.filter.checks import check_language, disallowed_pattern, question_scripts

    english = disallowed_pattern(question_scripts("Is the tone high or low?"))
    assert check_language(GOOD, english) is None
    assert check_language("<think>\nThe tone ≈ 900 Hz — about 25°, “high”.\n</think>\nhigh", english) is None
    assert check_language("<think>\nThe vowel /ə/ in café lasts 30 μs 🎵.\n</think>\nhigh", english) is None
    assert check_language("<think>\nThe tone 频率 is high.\n</think>\nhigh", english) == "language:script"
    assert check_language("<think>\nЗвук высокий.\n</think>\nhigh", english) == "language:script"
    chinese = disallowed_pattern(question_scripts("这个音调高还是低？"))
    assert check_language("<think>\n频率约 900 Hz，所以是高音。\n</think>\n高", chinese) is None
    assert check_language("<think>\n소리가 높다\n</think>\n高", chinese) == "language:script"


def test_check_degeneration():
    from distill.filter.checks import check_degeneration

    prose = " ".join(
        f"step {i}: the tone near {100 + i} Hz is compared with the boundary." for i in range(40)
    )
    assert check_degeneration(f"<think>\n{prose}\n</think>\nhigh") is None
    loop = "<think>\nThe tone is high. " + "I think the tone is high, so " * 30 + "\n</think>\nhigh"
    assert check_degeneration(loop) == "degenerate:loop"
    stuck = "<think>\n" + prose + " so the answer is" * 12
    assert check_degeneration(stuck) == "degenerate:loop"
    assert check_degeneration("<think>\nhigh" + " " * 20 + "tone\n</think>\nhigh") == "degenerate:whitespace"
    assert check_degeneration("<think>\nhigh" + "\n" * 9 + "tone\n</think>\nhigh") == "degenerate:whitespace"
    assert check_degeneration("<think>\nhigh" + "\t" * 9 + "tone\n</think>\nhigh") == "degenerate:whitespace"
    assert check_degeneration("<think>\nhigh\n\n\ntone   x\t\ty\n</think>\nhigh") is None
    # Formulaic but not looping: the same sentence frame with other numbers, never back to back.
    frames = " ".join(f"The tone near {300 + 7 * i} Hz is below the boundary." for i in range(60))
    assert check_degeneration(f"<think>\n{frames}\n</think>\nlow") is None
    assert check_degeneration("<think>\nshort\n</think>\nhigh") is None


@pytest.mark.parametrize(
    ("text", "flagged"),
    [
        ("I cannot hear the audio, but high tones are common.", True),
        ("Since I can't listen to the clip, I guess low.", True),
        ("As a text-based model, I have no access to sound.", True),
        ("As an AI language model I will assume it is high.", True),
        ("We don't actually hear anything here.", True),
        ("Without hearing the audio, the safest answer is low.", True),
        ("I hear a steady tone near 900 Hz, so it is high.", False),
        ("The model of the audio: I can hear two onsets and a text-like rhythm.", False),
        ("Listening closely, the second tone is louder.", False),
        ("As a large language model, I will reason about it.", True),
    ],
)
def test_check_self_cognition(text, flagged):
    from distill.filter.checks import check_self_cognition

    trace = f"<think>\n{text}\n</think>\nhigh"
    assert (check_self_cognition(trace) == "self_cognition") is flagged


@pytest.mark.parametrize(
    ("text", "reference", "choices", "reason"),
    [
        (
            "<think>\nThe tone is near 900 Hz, so the pitch is high.\n</think>\nhigh",
            "high",
            ["high", "low"],
            None,
        ),
        (
            "<think>\nThe tone is near 900 Hz, so the pitch is high.\n</think>\nlow",
            "high",
            ["high", "low"],
            "format:disagree",
        ),
        ("<think>\nNot low at all; the pitch is high.\n</think>\nA", "high", ["high", "low"], None),
        (
            "<think>\nIt sounds like something.\n</think>\nhigh",
            "high",
            ["high", "low"],
            None,
        ),  # names nothing
        ("<think>\nI count 4 onsets in 1.2 s.\n</think>\n4", "4", None, None),
        ("<think>\nI count 4 onsets in 1.2 s.\n</think>\n3", "4", None, "format:disagree"),
        ("<think>\nA dog, I think.\n</think>\ncat", "cat", None, None),  # free text: not judged
        (
            "<think>\nSo the answer is very low.\n</think>\nvery low",
            "very low",
            ["low", "very low", "high"],
            None,
        ),
        ("<think>\nThe tone is at 1,200 Hz.\n</think>\n1200 Hz", "1200 Hz", None, None),
        ("<think>\nIt lasts 500 ms.\n</think>\n0.5 s", "0.5 s", None, None),
    ],
)
def test_check_agreement(text, reference, choices, reason):
    from distill.filter.checks import check_agreement

    reasoning, _ = split_trace(text)
    assert check_agreement(reasoning, extract_answer(text), choices, reference) == reason


def test_check_correct_with_tag_tolerance_and_verifier():
    from distill.filter.answers import Tolerance

    assert (
        check_correct(extract_answer("<think>x</think>\n<answer>0.5 s</answer>", "answer"), "500 ms") is None
    )
    assert (
        check_correct(extract_answer("<think>x</think>\n<answer>445 Hz</answer>", "answer"), "440 Hz")
        == "answer:wrong"
    )
    assert check_correct("445 Hz", "440 Hz", tol=Tolerance(rel_tol=0.05)) is None
    seen = []

    def verifier(answer, reference, trace):
        seen.append((answer, reference, trace))
        return True

    assert check_correct("high", "low", ["high", "low"], verifier=verifier, trace={"id": 1}) is None
    assert seen == [("high", "low", {"id": 1})]


def test_judge_reply_parsing():
    from distill.filter.judge import parse_score

    assert parse_score("Score: 7") == 7.0
    assert parse_score("the first try says score=3 but on reflection Score: 8.5") == 8.5
    assert parse_score("seven out of ten") is None


def test_split_trace_fast_path_agrees_with_the_exact_one():
    for text in [
        "<think>I overthink> it</think>B",
        GOOD,
        "<think>a</think>b</think>c",
        " <think>x</think> y",
    ]:
        exact = split_trace(text)
        if text.count("<") == 2:  # the only case in which the filter takes the fast path
            assert split_trace(text, tags_unique=True) == exact, text
    assert split_trace("<think>I overthink> it</think>B") == ("I overthink> it", "B")


def test_one_measure_of_reasoning_length():
    """The filter's length check and eval's lengths count the tokens before the first `</think>`:
    as recorded, else by the caller's tokenizer, else estimated at four characters a token."""
    from distill.core.prompts import reasoning_tokens

    text = "<think>\n" + "abcd" * 10 + "</think>answer</think>"
    assert reasoning_tokens(17, text) == 17
    assert reasoning_tokens(None, text) == len("<think>\n" + "abcd" * 10) // 4 == 12
    assert reasoning_tokens(None, text, count=lambda t: len(t.split("b"))) == 11
    assert reasoning_tokens(None, "<think>never closed") is None
    assert reasoning_tokens(None, "</think>at once") == 1


def test_acoustic_terms_found_past_the_opening():
    """The check looks in the reasoning's opening first; a term only further in (or across the
    opening's end) still counts, and the decision is the whole reasoning's."""
    from distill.filter.checks import ACOUSTIC_HEAD_CHARS, check_acoustic_terms

    filler = "so we think about it. " * (ACOUSTIC_HEAD_CHARS // 10)
    terms, words = ("pitch", "hz"), ("word",)
    assert check_acoustic_terms(filler + "the pitch rises", terms, words) is None
    across = "x" * (ACOUSTIC_HEAD_CHARS - 2) + " Pitch"
    assert check_acoustic_terms(across, terms, words) is None
    assert (
        check_acoustic_terms(filler + "the pitch rises", terms, words, min_terms=2)
        == "lexical:no_acoustic_terms"
    )
    assert check_acoustic_terms("pitch " + filler + " 440 Hz", terms, words, min_terms=2) is None
    assert check_acoustic_terms(filler + " the word", terms, words) == "lexical:transcript_only"


def test_chinese_terms_count_in_text_that_holds_them():
    """An ASCII trace is searched for the ASCII terms only; a trace with other characters for all."""
    from distill.filter.checks import check_acoustic_terms

    terms, words = ("pitch", "音高"), ("word", "说")
    assert check_acoustic_terms("the 音高 rises", terms, words) is None
    assert check_acoustic_terms("so it rises, it 说", terms, words) == "lexical:transcript_only"
    assert check_acoustic_terms("so it rises", terms, words) == "lexical:no_acoustic_terms"
    assert check_acoustic_terms("the PITCH rises", terms, words) is None
