"""Synthetic task families: each answer is checked by measuring the audio, never by trusting the generator."""

import shutil

import numpy as np
import pytest

from data_pipelines.items import read_manifest, write_manifest
from data_pipelines.synthetic import (
    ANSWER_FORMATS,
    FAMILIES,
    SynthesizerMissingError,
    corpus,
    family_available,
    generate_split,
    make_example,
)
from data_pipelines.synthetic.speech import FREE_QUESTION, SPEECH_BOUNDARY_HZ
from data_pipelines.synthetic.timing import TEMPO_BOUNDARY_BPM, TEMPO_RANGES
from data_pipelines.synthetic.tones import PITCH_BOUNDARY_HZ

SR = 16000
SPEECH = "spoken_pitch_conflict"
needs_espeak = pytest.mark.skipif(shutil.which("espeak-ng") is None, reason="espeak-ng is not installed")
ALL_FAMILIES = [pytest.param(f, marks=needs_espeak) if f == SPEECH else f for f in sorted(FAMILIES)]
DIFFICULTIES = [1, 2, 3]


def examples(family, difficulty, n=20, split="train"):
    return [make_example(family, split, i, 0, difficulty, SR) for i in range(n)]


# --- measurements -------------------------------------------------------------------------------


def dominant_hz(audio, sample_rate):
    spectrum = np.abs(np.fft.rfft(audio))
    return np.argmax(spectrum) * sample_rate / len(audio)


def segments(audio, frame_s=0.01, min_frames=2):
    """(start, end) seconds of the runs where the 10 ms RMS envelope stands well above the noise floor."""
    hop = int(frame_s * SR)
    env = np.sqrt(np.mean(audio[: len(audio) // hop * hop].reshape(-1, hop) ** 2, axis=1))
    loud = env > max(4 * np.percentile(env, 10), 0.05 * env.max())
    edges = np.flatnonzero(np.diff(np.concatenate([[0], loud.astype(int), [0]])))
    runs = [(a, b) for a, b in zip(edges[::2], edges[1::2]) if b - a >= min_frames]
    return [(a * frame_s, b * frame_s) for a, b in runs]


def cut(audio, segment, trim=0.0):
    a, b = segment
    return audio[int((a + trim) * SR) : int((b - trim) * SR)]


def rms_db(x):
    return 20 * np.log10(np.sqrt(np.mean(x**2)))


def peak_share(x):
    """Share of the power within 40 Hz of the strongest spectral bin: near 1 for a tone, low for noise."""
    power = np.abs(np.fft.rfft(x * np.hanning(len(x)))) ** 2
    freqs = np.fft.rfftfreq(len(x), 1 / SR)
    near = np.abs(freqs - freqs[np.argmax(power)]) <= 40
    return power[near].sum() / power.sum()


def f0_hz(audio):
    """Median f0 of the loud frames: the autocorrelation peak (unbiased) between 80 and 400 Hz."""
    win, lo, hi = int(0.04 * SR), SR // 400, SR // 80
    frames = [audio[s : s + win] for s in range(0, len(audio) - win, win // 2)]
    top = max(np.sqrt(np.mean(f**2)) for f in frames)
    f0s = []
    for f in frames:
        if np.sqrt(np.mean(f**2)) < 0.3 * top:
            continue
        ac = np.correlate(f, f, "full")[win - 1 :] / (win - np.arange(win))
        f0s.append(SR / (lo + np.argmax(ac[lo:hi])))
    return float(np.median(f0s))


# --- every family ---------------------------------------------------------------------------------


@pytest.mark.parametrize("family", ALL_FAMILIES)
def test_family_is_deterministic_and_splits_differ(family):
    a = make_example(family, "train", 3, seed=7, difficulty=2, sample_rate=SR)
    b = make_example(family, "train", 3, seed=7, difficulty=2, sample_rate=SR)
    others = [
        make_example(family, split, 3, seed=7, difficulty=2, sample_rate=SR)
        for split in ("eval", "cold_start")
    ]
    assert np.array_equal(a.audio, b.audio)
    assert (a.question, a.free_question, a.choices, a.answer, a.reasoning, a.transcript) == (
        b.question,
        b.free_question,
        b.choices,
        b.answer,
        b.reasoning,
        b.transcript,
    )
    for c in others:
        assert not np.array_equal(a.audio[:1000], c.audio[:1000])


@pytest.mark.parametrize("family", ALL_FAMILIES)
def test_family_items_are_well_formed(family):
    for difficulty in DIFFICULTIES:
        for ex in examples(family, difficulty, n=6):
            assert ex.audio.dtype == np.float32 and ex.audio.ndim == 1
            assert len(ex.audio) <= 3.0 * SR and np.abs(ex.audio).max() <= 1.0
            assert ex.answer in ex.choices and len(set(ex.choices)) == len(ex.choices)
            assert ex.free_question and ex.free_question != ex.question
            assert ex.reasoning.startswith("<think>\n") and ex.reasoning.endswith(f"\n</think>\n{ex.answer}")
            assert ex.reasoning.splitlines()[-1] == ex.answer
            assert len(ex.reasoning) <= 220  # short enough for a tiny model's 64-128 new tokens
            assert ex.category == ("speech" if family == SPEECH else "sound")
            assert (ex.transcript is None) == (family != SPEECH)


# --- each family's answer against the measured sound -----------------------------------------------


@pytest.mark.parametrize("difficulty", DIFFICULTIES)
def test_pitch_level_answer_matches_the_sound(difficulty):
    for i, ex in enumerate(examples("pitch_level", difficulty)):
        hz = dominant_hz(ex.audio, SR)
        assert (hz > PITCH_BOUNDARY_HZ) == (ex.answer == "high"), (i, hz, ex.answer)


@pytest.mark.parametrize("difficulty", DIFFICULTIES)
def test_higher_of_two_answer_matches_the_sound(difficulty):
    for ex in examples("higher_of_two", difficulty, split="eval"):
        half = len(ex.audio) // 2
        first, second = dominant_hz(ex.audio[:half], SR), dominant_hz(ex.audio[half:], SR)
        assert (first > second) == (ex.answer == "first")


def test_pitch_families_keep_their_items():
    # The demo relies on these exact items: a change to the generators must not move them.
    assert make_example("pitch_level", "train", 0, 0, 2, SR).reasoning == (
        "<think>\nThe tone holds a steady pitch near 830 Hz. That is above the 500 Hz midpoint, "
        "so the pitch is high.\n</think>\nhigh"
    )
    assert make_example("higher_of_two", "train", 1, 0, 2, SR).reasoning == (
        "<think>\nThe first tone is near 530 Hz and the second near 1010 Hz. "
        "The second tone has the higher frequency.\n</think>\nsecond"
    )


@pytest.mark.parametrize("difficulty", DIFFICULTIES)
def test_count_events_answer_matches_the_sound(difficulty):
    for i, ex in enumerate(examples("count_events", difficulty)):
        onsets = len(segments(ex.audio))
        assert str(onsets) == ex.answer, (i, onsets, ex.answer)
        assert f"{onsets} onsets" in ex.reasoning
        assert ex.choices == sorted(ex.choices, key=int) and len(ex.choices) == 4
        assert "Answer with a number" in ex.free_question


@pytest.mark.parametrize("difficulty", DIFFICULTIES)
def test_louder_of_two_answer_matches_the_sound(difficulty):
    for i, ex in enumerate(examples("louder_of_two", difficulty)):
        first, second = segments(ex.audio)
        d = rms_db(cut(ex.audio, first, 0.05)) - rms_db(cut(ex.audio, second, 0.05))
        assert (d > 0) == (ex.answer == "first") and abs(d) > 2, (i, d, ex.answer)
        # Pitch is no cue: the louder tone is as often lower as higher (checked over the batch below).
    pitch_agrees = [
        (dominant_hz(ex.audio[: len(ex.audio) // 2], SR) > dominant_hz(ex.audio[len(ex.audio) // 2 :], SR))
        == (ex.answer == "first")
        for ex in examples("louder_of_two", difficulty, n=40)
    ]
    assert 0.25 < np.mean(pitch_agrees) < 0.75


@pytest.mark.parametrize("difficulty", DIFFICULTIES)
def test_longer_of_two_answer_matches_the_sound(difficulty):
    for i, ex in enumerate(examples("longer_of_two", difficulty)):
        (a1, b1), (a2, b2) = segments(ex.audio)
        assert ((b1 - a1) > (b2 - a2)) == (ex.answer == "first"), (i, b1 - a1, b2 - a2, ex.answer)


@pytest.mark.parametrize("difficulty", DIFFICULTIES)
def test_tempo_answer_matches_the_sound(difficulty):
    (slow_min, _), (_, fast_max) = TEMPO_RANGES[difficulty]
    for i, ex in enumerate(examples("tempo", difficulty)):
        onsets = [a for a, _ in segments(ex.audio, frame_s=0.005, min_frames=1)]
        bpm = 60 / np.median(np.diff(onsets))
        assert len(onsets) >= 3 and slow_min * 0.97 < bpm < fast_max * 1.03, (i, onsets)
        assert (bpm > TEMPO_BOUNDARY_BPM) == (ex.answer == "fast"), (i, bpm, ex.answer)


@pytest.mark.parametrize("difficulty", DIFFICULTIES)
def test_event_order_answer_matches_the_sound(difficulty):
    for i, ex in enumerate(examples("event_order", difficulty)):
        first, second = (peak_share(cut(ex.audio, s)) for s in segments(ex.audio))
        assert (first > second) == (ex.answer == "tone"), (i, first, second, ex.answer)


@pytest.mark.parametrize("difficulty", DIFFICULTIES)
def test_noise_or_tone_answer_matches_the_sound(difficulty):
    for i, ex in enumerate(examples("noise_or_tone", difficulty)):
        power = np.abs(np.fft.rfft(ex.audio * np.hanning(len(ex.audio)))) ** 2
        freqs = np.fft.rfftfreq(len(ex.audio), 1 / SR)
        band = power[(freqs > 250) & (freqs < 1600)]  # where the tone, if any, is
        # A steady tone is one bin far above the noise floor; in noise alone the top bin stays under
        # about 20x the median, and tones at the hardest SNR stay above about 50x (300 items each).
        line = band.max() / np.median(band)
        assert (line > 30) == (ex.answer == "tone"), (i, line, ex.answer)


@needs_espeak
def test_spoken_pitch_conflict_answer_is_the_voice_not_the_word():
    means = []
    for difficulty in DIFFICULTIES:
        f0 = {"high": [], "low": []}
        conflicts = 0
        for ex in examples(SPEECH, difficulty):
            f0[ex.answer].append(f0_hz(ex.audio))
            conflicts += ex.transcript != ex.answer
            assert ex.transcript in ("high", "low") and ex.free_question == FREE_QUESTION
        assert max(f0["low"]) < SPEECH_BOUNDARY_HZ < min(f0["high"]), (difficulty, f0)
        assert 5 <= conflicts <= 15  # about half the words contradict the voice
        means.append(np.mean(f0["high"]) - np.mean(f0["low"]))
    assert means[0] > means[1] > means[2] > 0, means  # harder: the two voices come closer


def test_spoken_pitch_conflict_without_espeak_says_how_to_install(monkeypatch):
    monkeypatch.setattr(shutil, "which", lambda *args, **kwargs: None)
    assert not family_available(SPEECH)
    assert family_available("pitch_level") and not family_available("no_such_family")
    with pytest.raises(
        SynthesizerMissingError, match=r"needs espeak-ng \(apt-get install espeak-ng\)"
    ) as err:
        make_example(SPEECH, "train", 0, 0, 1, SR)
    assert isinstance(err.value, RuntimeError)
    texts = corpus(n_per_family=3)  # the tokenizer corpus never needs the synthesizer
    assert FREE_QUESTION in texts


# --- splits and texts ---------------------------------------------------------------------------------


def test_corpus_is_deterministic_and_covers_every_family():
    texts = corpus(n_per_family=6)
    assert texts == corpus(n_per_family=6)
    for family in FAMILIES:
        if family != SPEECH:
            ex = make_example(family, "train", 0, 0, 1, 8000)
            assert {ex.question, ex.free_question, ex.reasoning} <= set(texts)
    assert sum(t.startswith("<think>\nThe voice's fundamental") for t in texts) == 6


def test_generate_split_answer_formats(tmp_path):
    families = ["pitch_level", "count_events"]
    assert ANSWER_FORMATS == ("choice", "free", "mixed")
    choice = generate_split(tmp_path, "eval", families, 8, 0, 2, SR)
    free = generate_split(tmp_path, "eval", families, 8, 0, 2, SR, answer_format="free")
    mixed = generate_split(tmp_path, "eval", families, 8, 0, 2, SR, answer_format="mixed")
    assert all(it.choices and it.answer in it.choices for it in choice)
    for it in free:
        ex = make_example(it.family, "eval", int(it.id[-5:]) // 2, 0, 2, SR)
        assert it.choices is None and it.question == ex.free_question and it.answer == ex.answer
    # Mixed alternates within each family: both families get both formats.
    assert [it.choices is None for it in mixed] == [False, False, True, True] * 2
    assert [it.audio for it in mixed] == [it.audio for it in choice]
    with pytest.raises(ValueError, match="answer_format 'open'"):
        generate_split(tmp_path, "eval", families, 2, 0, 2, SR, answer_format="open")


@pytest.mark.parametrize("family", ALL_FAMILIES)
def test_generate_split_items_roundtrip_through_manifest(tmp_path, family):
    items = generate_split(tmp_path, "train", [family], 4, 0, 3, SR, answer_format="mixed")
    write_manifest(tmp_path / "m.jsonl", items)
    back = read_manifest(tmp_path / "m.jsonl")
    assert [(b.question, b.choices, b.answer, b.category, b.transcript) for b in back] == [
        (it.question, it.choices, it.answer, it.category, it.transcript) for it in items
    ]
    assert all(it.category == ("speech" if family == SPEECH else "sound") for it in items)
