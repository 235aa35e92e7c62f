"""Grounding pieces that need no engine: counterfactual audio, swap partners, the text-solvable
rule, the lexical and audio-dependence checks, token alignment, and the filter applying them."""

from collections import Counter
from dataclasses import replace

import numpy as np
import pytest

from data_pipelines.items import Item
from distill.config import load_config
from distill.core.files import atomic_write_jsonl, read_jsonl
from distill.core.rundir import RunDir
from distill.core.schema import ConfigError
from distill.filter.checks import acoustic_terms, check_acoustic_terms, check_audio_dependence
from distill.filter.stage import filter_stage
from distill.grounding.counterfactual import counterfactual, noise, rms, silence, swap_partners
from distill.grounding.probe import ProbeTally, answer_options, chance, text_solvable
from distill.grounding.scoring import PrefixDonors, TraceLogprobs, completion_tokens, dependence
from distill.grounding.stage import summarize

EN = ("hz", "pitch", "loud", " db")
TRANSCRIPT = ("says", "the words")


def tone(seconds=1.0, freq=440.0, amp=0.3, rate=16000):
    t = np.arange(int(seconds * rate)) / rate
    return (amp * np.sin(2 * np.pi * freq * t)).astype(np.float32)


def item(i, answer, audio="a.wav"):
    return Item(id=f"i{i}", audio=audio, question="High or low?", answer=answer, choices=["high", "low"])


def test_silence_and_noise_keep_chunking_and_loudness_from_a_shared_bank():
    real = [tone(2.6), tone(0.55, amp=0.1), tone(0.1)]
    quiet = silence(real, 4000)
    # Quarter seconds, rounded down (never longer than the chunk); shorter chunks kept.
    assert [q.size for q in quiet] == [40000, 8000, 1600] and not any(q.any() for q in quiet)
    assert [q.size for q in silence(real, 0)] == [r.size for r in real]  # step 0: exact lengths
    hiss = noise(real, seed=7, step=4000)
    assert [h.size for h in hiss] == [40000, 8000, 1600] and hiss[0].dtype == np.float32
    level = 20 * np.log10(rms(real))
    assert abs(20 * np.log10(rms(hiss)) - level) <= 0.5 + 1e-3  # the same loudness within 0.5 dB ...
    # ... but none of the tone: no spectral peak at 440 Hz above the noise floor.
    spectrum = np.abs(np.fft.rfft(hiss[0][:16000]))
    assert spectrum[440] < 5 * np.median(spectrum)
    assert np.array_equal(noise(real, seed=7, step=4000)[0], hiss[0])
    assert not np.array_equal(noise(real, seed=8, step=4000)[0], hiss[0])
    # Clips of one length bucket and level share the very same noise (one input for the engine to
    # prepare); another level gets another array.
    other = [tone(2.7, freq=900.0), tone(0.6, amp=0.1), tone(0.1)]
    assert np.array_equal(noise(other, seed=7, step=4000)[0], hiss[0])
    louder = noise([tone(2.6, amp=0.6), tone(0.55, amp=0.2), tone(0.1, amp=0.6)], seed=7, step=4000)
    assert 20 * np.log10(rms(louder)) == pytest.approx(level + 6, abs=1.01)


def test_swap_takes_another_items_audio_with_another_answer():
    items = [item(i, "high" if i % 3 else "low") for i in range(9)]
    partners = swap_partners(items, seed=0)
    assert set(partners) == {it.id for it in items}
    assert all(
        p.id != i and p.answer != next(it for it in items if it.id == i).answer for i, p in partners.items()
    )
    # Deterministic and independent of the order the split lists its items in.
    assert {k: v.id for k, v in swap_partners(items[::-1], seed=0).items()} == {
        k: v.id for k, v in partners.items()
    }
    assert {k: v.id for k, v in swap_partners(items, seed=1).items()} != {
        k: v.id for k, v in partners.items()
    }
    # One answer everywhere: still another item; one item: nothing to swap with.
    same = swap_partners([item(i, "high") for i in range(3)], seed=0)
    assert all(p.id != i for i, p in same.items())
    assert swap_partners([item(0, "high")], seed=0) == {}
    partner_audio = [tone(2.0, 900.0)]
    assert counterfactual("swap", [tone()], 0, 16000, partner_audio) is partner_audio
    with pytest.raises(ValueError, match="another item"):
        counterfactual("swap", [tone()], 0, 16000, None)
    with pytest.raises(ValueError, match="unknown counterfactual 'reverse'"):
        counterfactual("reverse", [tone()], 0, 16000)


def test_text_solvable_means_right_without_audio_well_above_chance():
    assert chance("high", ["high", "low"]) == 0.5 and chance("B", ["A", "B", "C", "D"]) == 0.25
    # The options a probe's answer is held to: the choices, yes/no for a yes/no reference (any
    # case), none for an open answer.
    assert answer_options("high", ["high", "low"]) == ("high", "low")
    assert answer_options(" Yes", None) == answer_options("no", None) == ("yes", "no")
    assert answer_options("440", None) is None and answer_options("yes please", None) is None
    assert chance("Yes", None) == 0.5 and chance("440", None) == 0.0
    tally = ProbeTally()
    for kind, right in [
        ("real", True),
        ("real", True),
        ("silence", True),
        ("silence", True),
        ("noise", True),
        ("noise", False),
        ("swap", True),
        ("swap", True),
    ]:
        tally.add(kind, right)
    assert tally.accuracy("real") == 1.0 and tally.accuracy("noise") == 0.5 and tally.accuracy("swap") == 1.0
    assert tally.counterfactual_accuracy() == 5 / 6
    assert text_solvable(tally, chance_rate=0.5, margin=0.3)  # 0.83 >= 0.8
    assert not text_solvable(tally, chance_rate=0.5, margin=0.35)
    assert not text_solvable(ProbeTally(), 0.5, 0.3)  # no probe, no flag
    listening = ProbeTally()
    for kind, right in [("real", True), ("silence", True), ("silence", False), ("swap", False)]:
        listening.add(kind, right)
    assert not text_solvable(listening, 0.5, 0.3)  # a third right without audio: below chance
    free = ProbeTally()
    free.add("silence", True)
    free.add("silence", False)
    assert text_solvable(free, chance("440", None), 0.3)  # a free answer right half the time unheard


@pytest.mark.parametrize(
    ("reasoning", "min_terms", "expected"),
    [
        ("The tone sits near 830 Hz, above the midpoint.", 1, None),
        ("The PITCH is steady and it is LOUD.", 2, None),
        ("Near 830 Hz.", 2, "lexical:no_acoustic_terms"),
        ("The speaker says the word high, so the answer is high.", 1, "lexical:transcript_only"),
        ("It is probably high.", 1, "lexical:no_acoustic_terms"),
        ("The feedback loop suggests it.", 1, "lexical:no_acoustic_terms"),  # " db" needs a word start
        ("音高大约在830赫兹。", 1, None),
        (None, 1, None),  # no think block: the format check's business
    ],
)
def test_acoustic_terms_check(reasoning, min_terms, expected):
    acoustic = (*EN, "音高", "赫兹")
    assert check_acoustic_terms(reasoning, acoustic, TRANSCRIPT, min_terms) == expected


def test_acoustic_terms_stop_once_enough_are_found():
    assert acoustic_terms("pitch at 440 hz, loud", EN) == ["hz", "pitch", "loud"]
    assert acoustic_terms("pitch at 440 hz, loud", EN, enough=1) == ["hz"]


def test_audio_dependence_check_and_dependence_math():
    assert check_audio_dependence(None, 0.0, None) is None
    record = {"dependence": 0.02, "answer_dependence": -0.5}
    assert check_audio_dependence(record, 0.0, None) is None
    assert check_audio_dependence(record, 0.05, None) == "grounding:audio_independent"
    assert check_audio_dependence(record, None, 0.0) == "grounding:answer_independent"
    assert check_audio_dependence({"logprob": -3.0}, 0.5, 0.5) is None  # nothing to compare against
    real = TraceLogprobs([-1.0, -2.0, -3.0], [-0.5])
    counter = TraceLogprobs([-1.5, -2.5, -3.5], [-2.5])
    d = dependence(real.sums(), counter.sums())
    assert d.reasoning == pytest.approx(0.5) and d.answer == pytest.approx(2.0)
    with pytest.raises(ValueError, match="different tokens"):
        dependence(real.sums(), TraceLogprobs([-1.0], [-0.5]).sums())


def test_prefix_donors_fill_only_from_the_same_audio_and_tokens_that_computed_them():
    audio, same_content = [np.zeros(4)], [np.zeros(4)]
    donors = PrefixDonors()
    # A donor computed positions 3.. (the cache served 1..2 of its prompt).
    donors.add(audio, [1, 2, 3, 4, 5, 6], [None, None, None, -0.3, -0.4, -0.5])
    # A job whose cache hit reaches position 4 of its trace (which starts at 3): filled from the donor.
    values = [None, None, None, None, None, -0.9]
    assert donors.complete(audio, [1, 2, 3, 4, 5, 9], values, 3) is None
    assert values == [None, None, None, -0.3, -0.4, -0.9]
    # Another list of the same arrays (items that share a swap partner) is the same audio.
    assert donors.complete(list(audio), [1, 2, 3, 4, 5, 9], [None] * 5 + [-0.9], 3) is None
    assert donors.counts == Counter({"filled": 2})
    # Other tokens before the gap's end, or equal audio in other arrays: no donor,
    # and the end of the positions still missing.
    assert donors.complete(audio, [1, 2, 3, 7, 5, 9], [None] * 5 + [-0.9], 3) == 5
    assert donors.complete(same_content, [1, 2, 3, 4, 5, 9], [None] * 5 + [-0.9], 3) == 5
    # Nor one that did not compute the positions itself.
    donors.add(same_content, [1, 2, 3, 4, 5, 6], [None] * 4 + [-0.4, -0.5])
    assert donors.complete(same_content, [1, 2, 3, 4, 5, 9], [None] * 5 + [-0.9], 3) == 5
    # Nothing served in the trace: nothing to fill.
    assert donors.complete(same_content, [1, 2, 3, 4], [None, None, -0.2, -0.1], 2) is None
    assert donors.counts == Counter({"filled": 2})


def test_completion_tokens_line_up_with_the_prompt_and_split_at_think(tiny_model):
    from distill.core.prompts import chat_prompt
    from distill.models.tokens import load_tokenizer

    tok = load_tokenizer(str(tiny_model))
    prompt = chat_prompt(tok, "High or low?", "sys")
    completion = "<think>\nnear 830 Hz, so high\n</think>\nhigh"
    ids, reasoning = completion_tokens(tok, prompt, completion)
    whole = tok(prompt + completion, add_special_tokens=False)["input_ids"]
    assert whole[-len(ids) :] == ids and tok.decode(ids) == completion
    assert tok.decode(ids[:reasoning]).endswith("</think>") and tok.decode(ids[reasoning:]).strip() == "high"
    ids2, reasoning2 = completion_tokens(tok, prompt, "<think>\nno end")
    assert reasoning2 == len(ids2)


def test_grounding_config_is_checked():
    with pytest.raises(ConfigError, match="grounding.counterfactuals: unknown counterfactual"):
        load_config("configs/demo_cpu.yaml", ["grounding.counterfactuals=[silence,reverse]"])
    with pytest.raises(ConfigError, match="grounding.text_solvable="):
        load_config("configs/demo_cpu.yaml", ["grounding.text_solvable=ignore"])
    with pytest.raises(ConfigError, match="grounding.text_solvable_weight"):
        load_config("configs/demo_cpu.yaml", ["grounding.text_solvable_weight=2"])
    with pytest.raises(ConfigError, match="grounding.probe_samples: probing needs"):
        load_config("configs/demo_cpu.yaml", ["grounding.counterfactuals=[]"])
    with pytest.raises(ConfigError, match="grounding.score_against: unknown counterfactual"):
        load_config("configs/demo_cpu.yaml", ["grounding.score_against=[echo]"])
    with pytest.raises(ConfigError, match="grounding.probe_temperature=0 with grounding.probe_samples=2"):
        load_config("configs/demo_cpu.yaml", ["grounding.probe_temperature=0"])
    # An answer held to the options cannot reason first: a probe with reasoning answers freely.
    with pytest.raises(
        ConfigError, match="grounding.probe_answers=options with grounding.probe_prefix='<think>"
    ):
        load_config("configs/demo_cpu.yaml", ["grounding.probe_prefix=<think>"])
    assert (
        load_config(
            "configs/demo_cpu.yaml", ["grounding.probe_prefix=<think>", "grounding.probe_answers=free"]
        ).grounding.probe_answers
        == "free"
    )
    with pytest.raises(ConfigError, match="grounding.probe_answers"):
        load_config("configs/demo_cpu.yaml", ["grounding.probe_answers=letters"])
    with pytest.raises(ConfigError, match="filter.lexical.acoustic_terms.en: an empty term"):
        load_config("configs/demo_cpu.yaml", ["filter.lexical.acoustic_terms.en=[pitch, ' ']"])
    with pytest.raises(ConfigError, match="filter.lexical.min_acoustic_terms=99: more than the"):
        load_config("configs/demo_cpu.yaml", ["filter.lexical.min_acoustic_terms=99"])
    cfg = load_config("configs/demo_cpu.yaml", ["grounding.min_dependence=null"])
    assert cfg.grounding.min_dependence is None


GOOD = "<think>\nnear 900 Hz, above 500 Hz\n</think>\nhigh"


def write_round(tmp_path, tiny_model, *overrides):
    """A sampled round of three items with hand-written grounding rows: "t" is answerable from text,
    "d" has one trace that does not depend on the audio, one that was never scored."""
    cfg = load_config(
        "configs/demo_cpu.yaml",
        [f"output_dir={tmp_path}", "sample.num_shards=1", "filter.keep_per_prompt=4", *overrides],
    )
    rd = RunDir(cfg.run_dir).round(1)
    traces = [
        {
            "trace_id": f"{i}#{j}",
            "item_id": i,
            "sample_index": j,
            "audio": "a.wav",
            "prompt": "p",
            "completion": GOOD,
            "finish_reason": "stop",
            "reference": "high",
            "choices": ["high", "low"],
            "category": "sound",
        }
        for i in ("t", "d", "g")
        for j in range(2)
    ]
    atomic_write_jsonl(rd.shard_path(0, 1), traces)

    def row(item_id, solvable, deps):
        return {
            "item_id": item_id,
            "category": "sound",
            "model_sha256": "x",
            "text_solvable": solvable,
            "probe": {"real": [2, 2], "silence": [2 if solvable else 0, 2]},
            "traces": {
                f"{item_id}#{j}": {"dependence": d, "answer_dependence": 1.0}
                for j, d in enumerate(deps)
                if d is not None
            },
        }

    atomic_write_jsonl(
        rd.grounding_path(0, 1),
        [row("t", True, [0.2, 0.3]), row("d", False, [-0.1, 0.4]), row("g", False, [0.5, None])],
    )
    return cfg, rd


@pytest.mark.parametrize("policy", ["drop", "downweight", "keep"])
def test_filter_applies_text_solvable_policy_and_dependence_threshold(tmp_path, tiny_model, policy):
    cfg, rd = write_round(
        tmp_path, tiny_model, f"grounding.text_solvable={policy}", "grounding.text_solvable_weight=0.25"
    )
    stats = filter_stage(cfg, rd, tiny_model)
    kept = {t["trace_id"]: t for t in read_jsonl(rd.filtered)}
    rejected = {t["trace_id"]: t["rejected_because"] for t in read_jsonl(rd.rejected)}
    assert rejected["d#0"] == ["grounding:audio_independent"]
    assert rejected["g#1"] == ["grounding:unscored"]  # a passing trace must have been measured
    assert {"d#1", "g#0"} <= kept.keys() and "weight" not in kept["d#1"]
    assert (
        kept["d#1"]["grounding"]["dependence"] == 0.4 and kept["d#1"]["checks"]["audio_dependence"] == "pass"
    )
    if policy == "drop":
        assert rejected["t#0"] == rejected["t#1"] == ["grounding:text_solvable"]
    else:
        assert kept["t#0"]["text_solvable"] is True
        assert kept["t#0"].get("weight") == (0.25 if policy == "downweight" else None)
    assert stats["text_solvable_traces"] == 2 and stats["text_solvable_kept"] == (
        0 if policy == "drop" else 2
    )
    assert stats["dependence_rejected"]["n"] == (3 if policy == "drop" else 1)
    assert stats["dependence_kept"]["p50"] >= 0.3 and stats["acoustic_terms_rate"] == 1.0


def test_an_item_without_a_counterfactual_to_score_against_is_not_rejected(tmp_path, tiny_model):
    cfg, rd = write_round(tmp_path, tiny_model)
    rows = list(read_jsonl(rd.grounding_path(0, 1)))
    rows[2]["scorable"] = False  # e.g. a one-item split scored against "swap" only
    atomic_write_jsonl(rd.grounding_path(0, 1), rows)
    filter_stage(cfg, rd, tiny_model)
    assert "g#1" in {t["trace_id"] for t in read_jsonl(rd.filtered)}


def test_swap_partners_with_the_same_answer_are_not_probed_and_lone_items_not_scored(tmp_path, tiny_model):
    from distill.grounding.stage import GroundingContext

    cfg = load_config("configs/demo_cpu.yaml", [f"output_dir={tmp_path}"])
    same = [item(i, "high") for i in range(3)]
    ctx = GroundingContext(cfg, same, tiny_model)
    assert not ctx.informative_swap(same[0])  # a right answer under it says nothing
    mixed = GroundingContext(cfg, [item(0, "high"), item(1, "low")], tiny_model)
    assert mixed.informative_swap(mixed.items["i0"])
    lone = GroundingContext(cfg, [item(0, "high")], tiny_model)  # swap is the default score_against
    assert not lone.scorable(lone.items["i0"])


def test_filter_needs_every_grounding_shard(tmp_path, tiny_model):
    cfg, rd = write_round(tmp_path, tiny_model)
    rd.grounding_path(0, 1).unlink()
    with pytest.raises(
        FileNotFoundError, match=r"grounding shard\(s\) \[0\] of 1 missing; run the ground stage"
    ):
        filter_stage(cfg, rd, tiny_model)


def answer_trace(item_id, j, answer, hz):
    return {
        "trace_id": f"{item_id}#{j}",
        "item_id": item_id,
        "sample_index": j,
        "audio": "a.wav",
        "prompt": "p",
        "completion": (
            f"<think>\nnear {hz} Hz, {'above' if answer == 'high' else 'below'} 500 Hz\n</think>\n{answer}"
        ),
        "finish_reason": "stop",
        "reference": "high",
        "choices": ["high", "low"],
        "category": "sound",
    }


@pytest.mark.parametrize("policy", ["first", "shortest", "diverse"])
def test_keepable_scoring_scores_only_what_the_filter_keeps_and_keeps_the_same(tmp_path, tiny_model, policy):
    """score_traces=keepable leaves out passing traces the selection would not keep, and the filter
    then keeps exactly what it keeps when every passing trace is scored."""
    from distill.grounding.stage import GroundingContext

    cfg = load_config(
        "configs/demo_cpu.yaml",
        [
            f"output_dir={tmp_path}",
            "sample.num_shards=1",
            "filter.keep_per_prompt=2",
            f"filter.keep_policy={policy}",
            "filter.pass_rate_max=0.9",
            "grounding.score_traces=keepable",
        ],
    )
    # a: 6 of 8 right, only two of those (a#6, a#7) depend on the audio (more scoring passes);
    # b: 7 of 8 right; c: always right, outside the pass-rate band (nothing to score).
    answers = {
        "a": ["low", "high", "high", "high", "low", "high", "high", "high"],
        "b": ["high"] * 7 + ["low"],
        "c": ["high"] * 8,
    }
    traces = [
        answer_trace(i, j, a, 600 + 37 * j + (j % 3) * 1000)
        for i, row in answers.items()
        for j, a in enumerate(row)
    ]
    deps = {t["trace_id"]: 0.5 for t in traces} | {"a#1": -0.2, "a#2": -0.1, "a#3": -0.4, "a#5": -0.3}
    by_item = {i: [t for t in traces if t["item_id"] == i] for i in answers}
    ctx = GroundingContext(cfg, [item(i, "high") for i in range(3)], tiny_model)
    ctx.items = {i: replace(ctx.items[f"i{n}"], id=i) for n, i in enumerate(answers)}
    ctx.partners = {i: ctx.items["a"] for i in answers}  # scorable against "swap"
    batches = []

    def fake_score(batch, inputs, llm, records, cache_counts):  # the engine's scores, fixed per trace
        batches.append([t["trace_id"] for t in batch])
        records.update(
            {t["trace_id"]: {"dependence": deps[t["trace_id"]], "answer_dependence": 1.0} for t in batch}
        )

    ctx.score_batch = fake_score

    def kept_by_filter(records, passed_over, run):
        rd = RunDir(str(tmp_path / run)).round(1)
        atomic_write_jsonl(rd.shard_path(0, 1), traces)
        atomic_write_jsonl(
            rd.grounding_path(0, 1),
            [
                {
                    "item_id": i,
                    "model_sha256": "x",
                    "text_solvable": False,
                    "probe": {},
                    "passed_over": passed_over.get(i, []),
                    "traces": {
                        t["trace_id"]: records[t["trace_id"]] for t in by_item[i] if t["trace_id"] in records
                    },
                }
                for i in answers
            ],
        )
        filter_stage(cfg, rd, tiny_model)
        return {t["trace_id"] for t in read_jsonl(rd.filtered)}

    rules = {t["trace_id"]: ctx.prefilter.run(t) for t in traces}
    records, passed_over = ctx.score_traces(by_item, rules, {}, None, set(), Counter())
    every = {t["trace_id"]: {"dependence": deps[t["trace_id"]], "answer_dependence": 1.0} for t in traces}
    assert kept_by_filter(records, passed_over, "keepable") == kept_by_filter(every, {}, "all")
    assert not any(tid.startswith("c#") for tid in records)  # out of band: nothing scored
    assert len(records) < 13 and len(batches) >= 2  # 13 pass the rules; a's rejections asked for more
    assert set(records) | {t for ids in passed_over.values() for t in ids} | {
        t["trace_id"] for t in traces if t["completion"].endswith("low") or t["item_id"] == "c"
    } == set(deps)

    # Settings changed between the two stages: the filter would keep an unscored trace, and says so.
    cfg.filter.keep_per_prompt = 3
    with pytest.raises(RuntimeError, match="left unscored as one the selection would not keep"):
        kept_by_filter(records, passed_over, "changed")

    # Probes go to the items with a trace the selection can keep (c has none: a flag on it would
    # change nothing), or to every item; the metrics are shares of the probed items.
    probed = []

    def fake_probe(items, inputs, round_index, llm):
        probed.append([it.id for it in items])
        return {it.id: ProbeTally({"real": [2, 2], "silence": [2, 2]}) for it in items}, {}

    ctx.probe, ctx.inputs = fake_probe, lambda item, loaded: {}
    for mode, expected in (("keepable", ["a", "b"]), ("all", ["a", "b", "c"])):
        cfg.grounding.probe_items = mode
        rows = ctx.measure(traces, 1, None, "x", "y", Counter())
        assert probed[-1] == expected and [r["probed"] for r in rows] == [i in expected for i in answers]
        assert [r["text_solvable"] for r in rows] == [i in expected for i in answers]  # right under silence
        stats = summarize(rows, ["silence"])
        assert stats["items_probed"] == len(expected) and stats["text_solvable_share"] == 1.0
        assert stats["text_solvable_by_category"]["other"] == {
            "items": 3,
            "probed": len(expected),
            "text_solvable": len(expected),
        }


def test_the_real_audio_logprob_from_sampling_splits_where_scoring_splits(tiny_model):
    from distill.grounding.stage import sampled_logprob
    from distill.models.tokens import load_tokenizer, think_close_token_id
    from distill.rollout.engine import Completion
    from distill.rollout.sample import logprob_record

    tokenizer = load_tokenizer(str(tiny_model))
    prompt, completion = "<|im_start|>assistant\n<think>\n", "near 900 Hz\n</think>\nhigh"
    ids, reasoning = completion_tokens(tokenizer, prompt, completion)
    lps = tuple(-0.1 * (k + 1) for k in range(len(ids)))
    record = logprob_record(
        Completion(completion, len(ids), "stop", token_ids=tuple(ids), logprobs=lps),
        think_close_token_id(tokenizer),
    )
    assert record["reasoning_tokens"] == reasoning < len(ids)  # through </think>, as scoring splits the text
    sums = sampled_logprob({"sampled_logprob": record, "token_ids": ids})
    assert sums.reasoning == pytest.approx(sum(lps[:reasoning])) and sums.answer == pytest.approx(
        sum(lps[reasoning:])
    )
    assert (sums.reasoning_tokens, sums.answer_tokens) == (reasoning, len(ids) - reasoning)
    assert sampled_logprob({"token_ids": ids}) is None  # e.g. sampled from a server: scored instead
