"""The grounding stage on the real engines: vLLM prompt_logprobs scores against a transformers
forward pass, counterfactual scorings recomputed by hand, and an audio-blind model filtered."""

import shutil
from collections import Counter
from dataclasses import replace

import numpy as np
import pytest
import torch
from safetensors.torch import load_file, save_file

from distill.config import load_config
from distill.core.files import read_jsonl
from distill.core.prompts import item_prompt
from distill.core.rows import read_grounding, read_samples
from distill.core.rundir import RunDir
from distill.export.stage import hf_completion_logprobs
from distill.filter.stage import filter_stage
from distill.grounding.counterfactual import noise, silence
from distill.grounding.scoring import ScoreJob, completion_tokens, score
from distill.grounding.stage import ground_stage
from distill.loop import init_run_dir
from distill.models.tokens import audio_token_ids, load_tokenizer, think_close_token_id
from distill.rollout.engine import EngineCache, Request, Sampling, engine_prompt, generate, generate_batches
from distill.rollout.sample import logprob_record, sample_stage

pytestmark = pytest.mark.e2e

SMALL = [
    "data.synthetic.train_items=6",
    "data.synthetic.eval_items=2",
    "sample.n=2",
    "sample.max_tokens=24",
    "sample.num_shards=2",
    "grounding.score_traces=all",
    "grounding.probe_items=all",
    "grounding.score_against=[silence,noise,swap]",
    "grounding.probe_samples=3",
    "model.build_tiny=false",
    # every other item asks without its options: probes answer both ways
    "data.synthetic.answer_format=mixed",
]


def sampled_round(tmp_path, model, *overrides):
    cfg = load_config(
        "configs/demo_cpu.yaml", [f"output_dir={tmp_path}", f"model.path={model}", *SMALL, *overrides]
    )
    run = RunDir(cfg.run_dir)
    return cfg, init_run_dir(cfg, run), run.round(1)


def test_grounding_scores_are_real_forward_passes(tmp_path, tiny_model):
    cfg, data, rd = sampled_round(tmp_path, tiny_model)  # the default real_logprobs=sampled
    items = {it.id: it for it in data.train}
    with EngineCache(cfg.engine, cfg.seed) as engines:
        sample_stage(cfg, data.train, tiny_model, rd, engines.get)
        stats = ground_stage(cfg, data.train, tiny_model, rd, engines.get)
        llm = engines.get(tiny_model)
        tokenizer = load_tokenizer(str(tiny_model))
        rows = read_grounding(rd, 2)
        traces = read_samples(rd, 2)
        trace = traces[0]
        item = items[trace["item_id"]]
        from distill.data import audio_cache

        real = audio_cache(cfg).chunks(item.audio, item.audio_sha256)
        assert item_prompt(tokenizer, item, cfg.data.system_prompt, len(real)) == trace["prompt"]
        # The generation prefix was not generated: it goes with the prompt, and only the sampled
        # tokens are scored.
        prompt, completion = trace["prompt"] + "<think>\n", trace["completion"].removeprefix("<think>\n")
        step = round(cfg.grounding.bank_seconds * cfg.data.sample_rate)
        silent, hissed = silence(real, step), noise(real, cfg.seed, step)
        by_vllm = score(
            llm,
            tokenizer,
            [ScoreJob(prompt, completion, a) for a in (real, silent, hissed)],
            cfg.data.sample_rate,
        )
        # The ground stage scores the sampled tokens themselves.
        by_ids = score(
            llm,
            tokenizer,
            [ScoreJob(prompt, completion, a, trace["token_ids"]) for a in (real, silent, hissed)],
            cfg.data.sample_rate,
        )
        # Scorings that read the prefix cache score the same. The trace taken three times over is
        # longer than a block, so the cache also serves the head of the trace: the scoring without
        # the cache left it there, so of three jobs that hear one silence array, the first has no
        # donor and is scored again, and the next two take the head from it; one that hears
        # equal silence from other arrays is scored again.
        long_ids = trace["token_ids"] * 3
        fresh = score(llm, tokenizer, [ScoreJob(prompt, completion, silent, long_ids)], cfg.data.sample_rate)[
            0
        ]
        counts = Counter()
        reused = score(
            llm,
            tokenizer,
            [
                ScoreJob(prompt, completion, a, long_ids, reuse_prefix=True)
                for a in (silent, silent, silent, [c.copy() for c in silent])
            ],
            cfg.data.sample_rate,
            counts,
        )
        # The eval's thinking-budget curve cuts the full greedy trace at each budget: that is the
        # greedy trace of that budget only if greedy decoding is prefix-consistent. It is here.
        requests = [
            Request(prompt, real, cfg.data.sample_rate, 0),
            Request(prompt, silent, cfg.data.sample_rate, 0),
        ]
        full, short = generate(llm, requests, 0.0, 1.0, 24), generate(llm, requests, 0.0, 1.0, 6)
        assert [f.token_ids[:6] for f in full] == [s.token_ids for s in short]
        # Sampling returns its tokens' log-probabilities, and they are the teacher-forced ones of
        # the same tokens: the real audio's side of audio dependence needs no pass of its own. (A
        # random model's text often re-tokenizes into other tokens: scoring takes the sampled ids.)
        many_requests = [Request(prompt, real, cfg.data.sample_rate, s) for s in range(16)]
        many = generate(llm, many_requests, 1.0, 1.0, 24, think_close_token_id(tokenizer), logprobs=True)
        # With log-probabilities the text is decoded by distill, not vLLM: the same as vLLM's, even
        # for a random model's byte soup (characters split across tokens, cut at the end).
        plain = generate(llm, many_requests, 1.0, 1.0, 24, think_close_token_id(tokenizer))
        # Banned tokens (rollout/banned.py) are never sampled, and the samples are those of vLLM's
        # exact mask (allowed_token_ids: every other id) under the same seeds: banning the random
        # model's three most frequent tokens changes its traces, but only where they would have been.
        frequent = Counter(i for o in plain for i in o.token_ids).most_common(3)
        banned = tuple(i for i, _ in frequent)
        ours = generate(llm, many_requests, 1.0, 1.0, 24, banned=banned)
        vocab = llm.llm_engine.model_config.get_vocab_size()
        allowed = [i for i in range(vocab) if i not in banned]
        from vllm import SamplingParams

        reference = llm.generate(
            [engine_prompt(r.prompt, r.audio, r.sample_rate) for r in many_requests],
            [
                SamplingParams(temperature=1.0, max_tokens=24, seed=r.seed, allowed_token_ids=allowed)
                for r in many_requests
            ],
            use_tqdm=False,
        )
        assert not set(banned) & {i for o in ours for i in o.token_ids}
        assert [o.token_ids for o in ours] == [tuple(r.outputs[0].token_ids) for r in reference]
        assert [o.token_ids for o in ours] != [o.token_ids for o in plain]
        # Batches streamed through one engine run (the sample stage's shards) sample what separate
        # calls do; a caller that stops after the first leaves nothing running in the engine.
        stream = generate_batches(
            llm, [many_requests[:2], many_requests[2:4], many_requests[4:]], Sampling(1.0, 1.0, 24)
        )
        index, first = next(stream)
        stream.close()
        assert index == 0 and [o.token_ids for o in first] == [o.token_ids for o in plain[:2]]
        assert llm.llm_engine.get_num_unfinished_requests() == 0
        again = generate(llm, many_requests[2:4], 1.0, 1.0, 24)
        assert [o.token_ids for o in again] == [o.token_ids for o in plain[2:4]]
        streamed = dict(
            generate_batches(llm, [many_requests[:5], [], many_requests[5:]], Sampling(1.0, 1.0, 24))
        )
        assert streamed[1] == [] and [o.token_ids for o in streamed[0] + streamed[2]] == [
            o.token_ids for o in plain
        ]
        forced = score(
            llm,
            tokenizer,
            [ScoreJob(prompt, o.text, real, list(o.token_ids)) for o in many],
            cfg.data.sample_rate,
        )
        retokenized = sum(completion_tokens(tokenizer, prompt, o.text)[0] != list(o.token_ids) for o in many)
        # A trace's lineage seed reproduces it alone: the stage asks for an item's n traces in one
        # request, vLLM seeds trace j with the item's seed + j, and the lineage records that seed.
        second = next(t for t in traces if t["item_id"] == trace["item_id"] and t["sample_index"] == 1)
        assert second["lineage"]["seed"] == trace["lineage"]["seed"] + 1
        alone = generate(
            llm,
            [Request(prompt, real, cfg.data.sample_rate, second["lineage"]["seed"])],
            cfg.sample.temperature,
            cfg.sample.top_p,
            cfg.sample.max_tokens,
            banned=audio_token_ids(str(tiny_model)) if cfg.sample.ban_audio_tokens else None,
        )
        assert list(alone[0].token_ids) == second["token_ids"]

    # 1. vLLM's teacher-forced log-probabilities are a real forward pass: transformers agrees, to
    # the precision of vLLM's bf16 (its "auto" dtype for a float32 model) ...
    hf = {}
    for name, audio, lp in (("real", real, by_vllm[0]), ("silence", silent, by_vllm[1])):
        hf[name] = hf_completion_logprobs(tiny_model, [ScoreJob(prompt, completion, audio)], 16000)[0]
        assert len(hf[name]) == len(lp.reasoning) + len(lp.answer) > 5
        np.testing.assert_allclose(np.array(lp.reasoning + lp.answer), hf[name], atol=1e-2)
    # ... far closer than the difference the audio makes to the trace's likelihood.
    audio_effect = abs(hf["real"].sum() - hf["silence"].sum())
    assert audio_effect > 0.05
    assert abs(by_vllm[0].total - hf["real"].sum()) < 0.25 * audio_effect
    assert abs(by_vllm[1].total - hf["silence"].sum()) < 0.25 * audio_effect

    assert [(o.text, o.token_ids, o.finish_reason) for o in many] == [
        (o.text, o.token_ids, o.finish_reason) for o in plain
    ]
    assert any(tokenizer.decode(o.token_ids) != o.text for o in plain)  # the cases stream_text is for
    assert all(
        len(o.logprobs) == o.num_tokens == len(lp.reasoning) + len(lp.answer) for o, lp in zip(many, forced)
    )
    for o, lp in zip(many, forced, strict=True):
        assert abs(sum(o.logprobs) - lp.total) < 0.25 * audio_effect
        assert logprob_record(o, think_close_token_id(tokenizer))["reasoning_tokens"] == len(lp.reasoning)
    assert retokenized  # the case the sampled ids are for

    for lp in reused:
        np.testing.assert_allclose(lp.reasoning + lp.answer, fresh.reasoning + fresh.answer, atol=1e-4)
    assert counts["rescored"] == 2 and counts["filled"] == 2 and counts["reused"] > 0

    # 2. The stored dependence is the real-minus-counterfactual gap of the sampled tokens' scorings
    # (the real side as sampling returned it).
    record = rows[item.id]["traces"][trace["trace_id"]]
    assert all("sampled_logprob" in t and "token_ids" in t for t in traces)
    assert record["real_logprob"] == "sampled" and stats["traces_real_from_sampling"] == len(traces)
    # The stage's scorings read the prefix cache (an item's prompts are longer than a block), and
    # they are the ones recomputed here without it.
    assert stats["prefix_tokens_reused"] > 0
    tol = 1e-3
    n = len(by_ids[0].reasoning)
    for kind, lp in (("silence", by_ids[1]), ("noise", by_ids[2])):
        expected = (sum(by_ids[0].reasoning) - sum(lp.reasoning)) / n
        assert record["against"][kind]["reasoning"] == pytest.approx(expected, abs=tol)
        assert record["against"][kind]["answer"] == pytest.approx(
            sum(by_ids[0].answer) - sum(lp.answer), abs=tol * n
        )
    assert record["dependence"] == min(a["reasoning"] for a in record["against"].values())
    assert record["logprob"] == pytest.approx(by_ids[0].total, abs=tol * n)

    # 3. Every item has its probes (3 answers per input), its swap partner, a flag; every trace a score.
    # A multiple-choice item's probes answer one of its options (grounding.probe_answers=options),
    # which the random model, left free, never does: it writes byte soup, as the free items show.
    assert set(rows) == set(items)
    assert {bool(it.choices) for it in items.values()} == {True, False}
    for row in rows.values():
        assert row["probe"].keys() == {"real", "silence", "noise", "swap"}
        assert all(total == 3 for _, total in row["probe"].values())
        options = items[row["item_id"]].choices
        for answers in row["probe_answers"].values():
            assert set(answers) <= set(options) if options else len(set(answers)) > 1  # n=3 distinct samples
        assert row["swap_partner"] in items and row["swap_partner"] != row["item_id"]
        assert isinstance(row["text_solvable"], bool)
    # The random model never generated an audio token (sampling bans them: the engine would read one
    # as a slot for audio), so every trace was scored.
    assert not any(
        tok in t["completion"] for t in traces for tok in ("<|AUDIO|>", "<|audio_bos|>", "<|audio_eos|>")
    )
    scored = {tid for row in rows.values() for tid in row["traces"]}
    assert scored == {t["trace_id"] for t in traces} and stats["traces_scored"] == len(traces)
    real_acc, cf_acc = stats["probe_accuracy"]["real"], stats["counterfactual_accuracy"]
    assert stats["grounding_gap"] == pytest.approx(real_acc - cf_acc, abs=1e-4)
    assert sum(c["items"] for c in stats["text_solvable_by_category"].values()) == len(items)

    # 4. The filter carries the measurements into its outputs and metrics.
    fstats = filter_stage(cfg, rd, tiny_model)
    out = list(read_jsonl(rd.rejected)) + list(read_jsonl(rd.filtered))
    assert all("audio_dependence" in t["checks"] and "grounding" in t for t in out)
    assert fstats["dependence_rejected"]["n"] + (fstats["dependence_kept"] or {"n": 0})["n"] == len(traces)


def audio_blind_copy(model_dir, out):
    """The same model with its audio projector zeroed: every audio input looks alike to it."""
    shutil.copytree(model_dir, out)
    weights = out / "model.safetensors"
    state = load_file(weights)
    zeroed = [k for k in state if "multi_modal_projector" in k]
    assert zeroed
    save_file(
        {k: torch.zeros_like(v) if k in zeroed else v for k, v in state.items()},
        weights,
        metadata={"format": "pt"},
    )
    return out


def test_traces_that_do_not_depend_on_the_audio_are_filtered(tmp_path, tiny_model):
    blind = audio_blind_copy(tiny_model, tmp_path / "blind")
    # Default thresholds; exact-length silence and noise, so their token positions match the clip's;
    # the real audio scored by a teacher-forced pass too (the test above covers the sampled side).
    cfg, data, rd = sampled_round(
        tmp_path, blind, "grounding.bank_seconds=0", "grounding.real_logprobs=scored"
    )
    with EngineCache(cfg.engine, cfg.seed) as engines:
        sample_stage(cfg, data.train, blind, rd, engines.get)
        # An array task grounds its own shard and leaves the stage open; a plain run does the rest.
        task = replace(cfg, sample=replace(cfg.sample, shard_index=1))
        assert ground_stage(task, data.train, blind, rd, engines.get) is None
        assert [p.name for p in rd.grounding_dir.glob("shard-*")] == ["shard-00001-of-00002.jsonl"]
        stats = ground_stage(cfg, data.train, blind, rd, engines.get)
    # Heard through a zeroed projector, real audio, silence and noise of the same length give the
    # same trace likelihood; another item's audio differs only by its length (token positions).
    assert stats["dependence"]["n"] >= len(data.train)
    records = [r for row in read_grounding(rd, 2).values() for r in row["traces"].values()]
    assert all(r["real_logprob"] == "scored" for r in records)
    assert all(abs(r["against"][k]["reasoning"]) < 1e-4 for r in records for k in ("silence", "noise"))
    assert (
        abs(stats["dependence"]["p10"]) < 2e-3
        and abs(stats["dependence"]["p90"]) < cfg.grounding.min_dependence
    )
    fstats = filter_stage(replace(cfg), rd, blind)
    traces = list(read_jsonl(rd.rejected))
    scored = [t for t in traces if "grounding" in t]
    assert (
        fstats["failures_by_check"]["grounding:audio_independent"] == len(scored) == stats["dependence"]["n"]
    )
    assert all("grounding:audio_independent" in t["rejected_because"] for t in scored)
    assert not list(read_jsonl(rd.filtered)) and fstats["dependence_kept"] is None
