"""The ground stage, between sample and filter: does the model listen, item by item and trace by trace?

For each sample shard it writes `grounding/shard-XXXXX-of-YYYYY.jsonl`, one row per item:
- probe answers sampled with the real audio and with each counterfactual (silence, noise of the
  same loudness, another item's audio), and whether the item is answerable from text alone;
- for each scored trace, its audio dependence: the teacher-forced log-probability of the trace
  with the real audio minus with each counterfactual (vLLM prompt_logprobs), per reasoning token
  and over the answer. The cheap rule checks pre-filter which traces are scored.
It runs on the engine that sampled the round (same model), so it costs no engine start; the
filter stage reads the rows and applies the thresholds. Shards resume and run as array tasks
exactly like sample shards.
"""

from __future__ import annotations

import time
from collections import Counter, defaultdict
from collections.abc import Callable
from dataclasses import replace
from pathlib import Path

from data_pipelines.items import Item
from distill.config import Config
from distill.core.files import atomic_write_jsonl, sha256_file
from distill.core.prompts import item_prompt
from distill.core.rows import GROUNDING_SCHEMA_VERSION, check_shard_inputs, read_grounding, read_samples
from distill.core.rundir import RoundDir
from distill.core.seeds import sample_seed
from distill.core.stages import StageContext, shard_plan
from distill.core.stats import distribution
from distill.data import audio_cache
from distill.filter.checks import check_control_tokens
from distill.filter.rules import RulePipeline
from distill.filter.selection import dependence_result, grounded_results, item_decision
from distill.grounding.counterfactual import bank_step, counterfactual_inputs, same_answer, swap_partners
from distill.grounding.probe import ProbeTally, answer_options, chance, text_solvable
from distill.grounding.scoring import LogprobSums, ScoreJob, dependence, score
from distill.models.tokens import audio_token_ids, audio_tokens, control_tokens, load_tokenizer
from distill.rollout.engine import Request, generate, verified_weights_hash


def ground_stage(
    cfg: Config, items: list[Item], model_dir: Path, rd: RoundDir, get_engine: Callable
) -> dict | None:
    """Measure the missing grounding shards of round `rd`; return the round's grounding stats once
    every shard is on disk (None while other array tasks still owe theirs)."""
    gcfg = cfg.grounding
    if not gcfg.enabled:
        return {"enabled": False}
    count, indices = shard_plan(cfg)
    model_hash = verified_weights_hash(model_dir)
    ctx = GroundingContext(cfg, items, model_dir)
    start, done, skipped = time.time(), 0, 0
    timing: Counter = Counter()
    for shard in indices:
        path = rd.grounding_path(shard, count)
        samples_sha256 = (
            sha256_file(rd.shard_path(shard, count)) if rd.shard_path(shard, count).exists() else None
        )
        if path.exists():
            # From the model the round samples from, and from the sample shard on disk now (one
            # resampled since is measured again).
            check_shard_inputs(
                path,
                {"model_sha256": model_hash, "samples_sha256": samples_sha256},
                "delete the shard (or grounding/) to measure again",
            )
            skipped += 1
            continue
        traces = read_samples(rd, count, shards=[shard])
        llm = get_engine(model_dir)
        if gcfg.reuse_prefix_cache and not done:
            # Sampling left its traces in the prefix cache. A scoring that reads it under a prompt
            # sampling asked (the real one; a swap whose partner asks the same question, as
            # templated questions do) would find the heads of traces that begin like a sampled one
            # served without log-probabilities, and score them twice (the demo's round 2: 157 of 280).
            llm.reset_prefix_cache()
        rows = ctx.measure(traces, rd.index, llm, model_hash, samples_sha256, timing)
        atomic_write_jsonl(path, rows)
        done += 1
        print(
            f"ground: shard {shard + 1}/{count}: {len(rows)} items, {sum(r['probed'] for r in rows)} probed, "
            f"{sum(len(r['traces']) for r in rows)} traces scored -> {path}",
            flush=True,
        )
    print(
        f"ground: {done} shard(s) measured, {skipped} already on disk, {time.time() - start:.1f}s "
        f"(probes {timing['probe']:.1f}s, scoring {timing['score']:.1f}s; "
        f"prefix cache: {timing['prefix_reused']} "
        f"prompt tokens reused, {timing['prefix_filled']} trace heads filled, {timing['prefix_rescored']} "
        "traces scored again)",
        flush=True,
    )
    if rd.missing_shards(rd.grounding_path, count):
        return None
    stats = summarize(read_grounding(rd, count).values(), gcfg.counterfactuals)
    # This process's own timing (a resumed stage or one array task times only its shards).
    return {
        **stats,
        "probe_seconds": round(timing["probe"], 2),
        "score_seconds": round(timing["score"], 2),
        "prefix_tokens_reused": timing["prefix_reused"],
        "prefix_heads_filled": timing["prefix_filled"],
        "prefix_rescored": timing["prefix_rescored"],
    }


class GroundingContext:
    """What every shard of a round needs: tokenizer, audio, swap partners, the pre-filter."""

    def __init__(self, cfg: Config, items: list[Item], model_dir: Path):
        self.cfg = cfg
        self.items = {it.id: it for it in items}
        self.partners = swap_partners(items, cfg.seed)
        self.tokenizer = load_tokenizer(str(model_dir))
        self.cache = audio_cache(cfg)
        self.control_tokens = control_tokens(str(model_dir))
        self.audio_tokens = tuple(audio_tokens(str(model_dir)))
        self.banned = audio_token_ids(str(model_dir)) if cfg.sample.ban_audio_tokens else None
        self.prefilter = RulePipeline(cfg.filter, self.control_tokens)
        self.answer_check = RulePipeline(replace(cfg.filter, checks=["correct"]), ())
        self.answer_graded = "correct" in self.prefilter.enabled

    def inputs(self, item: Item, loaded: dict[str, list]) -> dict[str, list]:
        """The item's audio as heard under "real" and every counterfactual the probes or the
        scoring use, each loaded or built once; "swap" is absent when the item has no partner (a
        one-item split). Noise depends on the run's seed, not the item: clips of one length and
        level share it (counterfactual.py). `loaded`: recordings by sha256, so the items that
        share a swap partner hear the same arrays (which is how scoring knows they are the same)."""
        gcfg = self.cfg.grounding

        def recording(it: Item) -> list:
            key = it.audio_sha256 or it.audio
            if key not in loaded:
                loaded[key] = self.cache.chunks(it.audio, it.audio_sha256)
            return loaded[key]

        real = recording(item)
        kinds = dict.fromkeys([*gcfg.counterfactuals, *gcfg.score_against])
        step = bank_step(gcfg.bank_seconds, self.cfg.data.sample_rate)
        return {
            "real": real,
            **counterfactual_inputs(item, real, kinds, self.partners, recording, self.cfg.seed, step),
        }

    def informative_swap(self, item: Item) -> bool:
        """A swap partner with the same answer (a split with one answer) tells nothing when the
        model answers right; such swaps are left out of the probe tally."""
        partner = self.partners.get(item.id)
        return partner is not None and not same_answer(partner, item)

    def prompt(self, item: Item, audio: list) -> str:
        return item_prompt(self.tokenizer, item, self.cfg.data.system_prompt, len(audio))

    def measure(
        self, traces: list[dict], round_index: int, llm, model_hash: str, samples_sha256: str, timing: Counter
    ) -> list[dict]:
        """The grounding rows of one shard's items (in the order their traces come)."""
        gcfg = self.cfg.grounding
        by_item: dict[str, list[dict]] = defaultdict(list)
        for t in traces:
            by_item[t["item_id"]].append(t)
        missing = [i for i in by_item if i not in self.items]
        if missing:
            raise RuntimeError(
                f"ground: traces of item(s) {missing[:5]} that are not in the train split; the "
                "samples belong to another data set (delete the round to resample)"
            )
        items = [self.items[i] for i in by_item]
        loaded: dict[str, list] = {}
        inputs = {item.id: self.inputs(item, loaded) for item in items}
        rules = {t["trace_id"]: self.prefilter.run(t) for t in traces}
        probed = {
            item.id for item in items if gcfg.probe_items == "all" or self.keepable(by_item[item.id], rules)
        }
        t0 = time.time()
        tallies, answers = self.probe([item for item in items if item.id in probed], inputs, round_index, llm)
        timing["probe"] += time.time() - t0
        solvable = {
            i
            for i, tally in tallies.items()
            if text_solvable(
                tally, chance(self.items[i].answer, self.items[i].choices), gcfg.text_solvable_margin
            )
        }
        t0 = time.time()
        cache_counts: Counter = Counter()
        scores, passed_over = self.score_traces(by_item, rules, inputs, llm, solvable, cache_counts)
        timing["score"] += time.time() - t0
        timing.update({f"prefix_{k}": n for k, n in cache_counts.items()})
        rows = []
        for item in items:
            rate = chance(item.answer, item.choices)
            partner = self.partners.get(item.id)
            rows.append(
                {
                    "schema_version": GROUNDING_SCHEMA_VERSION,
                    "item_id": item.id,
                    "category": item.category,
                    "family": item.family,
                    "model_sha256": model_hash,
                    "swap_partner": partner.id if partner else None,
                    "samples_sha256": samples_sha256,
                    # Its traces have a counterfactual to be scored against (the filter expects a score
                    # on every trace that passed the rules only then).
                    "scorable": self.scorable(item),
                    "chance": round(rate, 4),
                    # Probed: it has a trace the filter can keep (grounding.probe_items=keepable), or all are.
                    "probed": item.id in probed,
                    "probe": tallies[item.id].counts if item.id in tallies else {},
                    "probe_answers": answers.get(item.id, {}),
                    "text_solvable": item.id in solvable,
                    "traces": {
                        t["trace_id"]: scores[t["trace_id"]]
                        for t in by_item[item.id]
                        if t["trace_id"] in scores
                    },
                    # Passing traces left unscored: the filter's selection would not keep them.
                    "passed_over": passed_over.get(item.id, []),
                }
            )
        return rows

    def probe(
        self, items: list[Item], inputs: dict[str, dict[str, list]], round_index: int, llm
    ) -> tuple[dict[str, ProbeTally], dict[str, dict]]:
        """Sample probe_samples short answers per item and input (held to the item's options with
        grounding.probe_answers=options); tally the right ones."""
        gcfg, sr = self.cfg.grounding, self.cfg.data.sample_rate
        requests, meta = [], []
        for item in items:
            options = answer_options(item.answer, item.choices) if gcfg.probe_answers == "options" else None
            for kind in ("real", *gcfg.counterfactuals):
                if not gcfg.probe_samples or (kind == "swap" and not self.informative_swap(item)):
                    continue
                audio = inputs[item.id][kind]
                seed = sample_seed(self.cfg.seed, round_index, f"{item.id}/probe/{kind}", 0)
                requests.append(
                    Request(self.prompt(item, audio) + gcfg.probe_prefix, audio, sr, seed, options)
                )
                meta.extend([(item, kind)] * gcfg.probe_samples)
        tallies = {it.id: ProbeTally() for it in items}
        answers: dict[str, dict[str, list[str]]] = {it.id: {} for it in items}
        if not requests:
            return tallies, answers
        outs = generate(
            llm,
            requests,
            gcfg.probe_temperature,
            1.0,
            gcfg.probe_max_tokens,
            n=gcfg.probe_samples,
            banned=self.banned,
        )
        for (item, kind), out in zip(meta, outs, strict=True):
            result = self.answer_check.run(
                {
                    "completion": gcfg.probe_prefix + out.text,
                    "reference": item.answer,
                    "choices": item.choices,
                    "question": item.question,
                }
            )
            tallies[item.id].add(kind, result["correct"] is None)
            answers[item.id].setdefault(kind, []).append(out.text)
        return tallies, answers

    def keepable(self, traces: list[dict], rules: dict[str, dict]) -> bool:
        """Whether the filter's selection keeps one of an item's traces (`rules`: trace id -> rule
        check results) before grounding has a say: text-solvability and audio dependence can only
        drop or down-weight traces, so an item without one is not worth probing."""
        results = {
            t["trace_id"]: grounded_results(rules[t["trace_id"]], False, self.cfg.grounding) for t in traces
        }
        _, decision, _ = item_decision(self.cfg.filter, traces, results, self.answer_graded)
        return bool(decision.kept)

    def scorable(self, item: Item) -> bool:
        """Whether the item has a counterfactual to score its traces against (a swap needs a partner)."""
        return any(kind != "swap" or item.id in self.partners for kind in self.cfg.grounding.score_against)

    def score_traces(
        self,
        by_item: dict[str, list[dict]],
        rules: dict[str, dict],
        inputs: dict[str, dict[str, list]],
        llm,
        flagged: set[str],
        cache_counts: Counter,
    ) -> tuple[dict[str, dict], dict[str, list[str]]]:
        """(trace id -> audio dependence, item id -> passing traces left unscored). Which traces are
        scored follows grounding.score_traces; "keepable" asks the filter's own selection which
        traces it would keep, scores those, and asks again with the dependence rejections known
        until every trace it would keep is scored (`rules`: trace id -> rule check results,
        `flagged`: the items answerable from text, `cache_counts`: what the scorings shared through
        the prefix cache, counted as scoring.PrefixDonors counts it)."""
        gcfg = self.cfg.grounding
        mode = (
            "passing"
            if gcfg.score_traces == "keepable" and self.cfg.filter.judge.enabled
            else gcfg.score_traces
        )
        records: dict[str, dict] = {}
        passed_over: dict[str, list[str]] = {}
        todo = {item_id: traces for item_id, traces in by_item.items() if self.scorable(self.items[item_id])}
        if mode == "all":
            self.score_batch(
                [t for traces in todo.values() for t in traces], inputs, llm, records, cache_counts
            )
            return records, passed_over
        results = {
            t["trace_id"]: grounded_results(rules[t["trace_id"]], t["item_id"] in flagged, gcfg)
            for traces in todo.values()
            for t in traces
        }
        passing = [t for traces in todo.values() for t in traces if not any(results[t["trace_id"]].values())]
        if mode == "passing":
            self.score_batch(passing, inputs, llm, records, cache_counts)
            return records, passed_over
        while True:
            wanted = []
            for traces in todo.values():
                ordered, decision, _ = item_decision(self.cfg.filter, traces, results, self.answer_graded)
                wanted += [ordered[i] for i in decision.kept if ordered[i]["trace_id"] not in records]
            if not wanted:
                break
            self.score_batch(wanted, inputs, llm, records, cache_counts)
            for t in wanted:  # a trace it could not score fails like the filter fails it
                results[t["trace_id"]]["audio_dependence"] = dependence_result(
                    records.get(t["trace_id"]), gcfg
                )
        for t in passing:
            if t["trace_id"] not in records and results[t["trace_id"]]["audio_dependence"] is None:
                passed_over.setdefault(t["item_id"], []).append(t["trace_id"])
        return records, passed_over

    def score_batch(
        self,
        traces: list[dict],
        inputs: dict[str, dict[str, list]],
        llm,
        records: dict[str, dict],
        cache_counts: Counter,
    ) -> None:
        """Score `traces` against every counterfactual of grounding.score_against into `records`.
        Only the generated tokens count: the generation prefix (`<think>\n`) goes with the prompt.
        The real audio's log-probability comes from sampling where the trace carries it, else from
        one more teacher-forced pass. With grounding.reuse_prefix_cache the scorings read the prefix
        cache: an item's traces share each prompt they are scored under (scoring.py)."""
        gcfg, sr = self.cfg.grounding, self.cfg.data.sample_rate
        prefix = self.cfg.sample.generation_prefix
        jobs, meta = [], []
        per_trace: dict[str, dict] = defaultdict(dict)
        sources: dict[str, str] = {}  # where the real audio's log-probability came from
        for t in traces:
            if check_control_tokens(t["completion"], self.audio_tokens):
                continue  # the engine would read an audio token in the trace as a slot to fill
            item_inputs = inputs[t["item_id"]]
            item = self.items[t["item_id"]]
            head = prefix if prefix and t["completion"].startswith(prefix) else ""
            ids = t.get("token_ids")
            sampled = sampled_logprob(t) if gcfg.real_logprobs == "sampled" else None
            sources[t["trace_id"]] = "scored" if sampled is None else "sampled"
            if sampled is not None:
                per_trace[t["trace_id"]]["real"] = sampled
            for kind, audio in item_inputs.items():
                if (
                    kind == "real"
                    and sampled is not None
                    or kind != "real"
                    and kind not in gcfg.score_against
                ):
                    continue
                jobs.append(
                    ScoreJob(
                        self.prompt(item, audio) + head,
                        t["completion"][len(head) :],
                        audio,
                        ids,
                        reuse_prefix=gcfg.reuse_prefix_cache,
                    )
                )
                meta.append((t["trace_id"], kind))
        for lo in range(0, len(jobs), gcfg.score_batch):
            for (trace_id, kind), lp in zip(
                meta[lo : lo + gcfg.score_batch],
                score(llm, self.tokenizer, jobs[lo : lo + gcfg.score_batch], sr, cache_counts),
                strict=True,
            ):
                per_trace[trace_id][kind] = lp.sums()
        for trace_id, lps in per_trace.items():
            if len(lps) > 1:
                records[trace_id] = {**trace_dependence(lps), "real_logprob": sources[trace_id]}


def sampled_logprob(trace: dict) -> LogprobSums | None:
    """The real audio's log-probability of the trace as sampling returned it, for the tokens it
    sampled (None: the trace carries no such record, e.g. one sampled from a server)."""
    record, ids = trace.get("sampled_logprob"), trace.get("token_ids")
    if record is None or ids is None:
        return None
    return LogprobSums(
        record["reasoning"],
        record["answer"],
        record["reasoning_tokens"],
        len(ids) - record["reasoning_tokens"],
    )


def trace_dependence(lps: dict[str, LogprobSums]) -> dict:
    """A trace's grounding record from its scorings: against each counterfactual, and the smallest
    gain over them (the counterfactual the trace depends on least decides)."""
    real = lps["real"]
    against = {kind: dependence(real, lp) for kind, lp in lps.items() if kind != "real"}
    record = {
        "logprob": round(real.total, 4),
        "reasoning_tokens": real.reasoning_tokens,
        "answer_tokens": real.answer_tokens,
        "against": {
            k: {"reasoning": round(d.reasoning, 4), "answer": round(d.answer, 4)} for k, d in against.items()
        },
    }
    if against:
        record["dependence"] = round(min(d.reasoning for d in against.values()), 4)
        record["answer_dependence"] = round(min(d.answer for d in against.values()), 4)
    return record


def summarize(rows, kinds: list[str]) -> dict:
    """Round grounding metrics: probe accuracy per input, the grounding gap (real minus
    counterfactual accuracy), text-solvable items per category (shares of the probed items), and
    the dependence distribution."""
    totals = ProbeTally()
    by_category: dict[str, Counter] = defaultdict(Counter)
    deps, items, probed, flagged, from_sampling, passed_over = [], 0, 0, 0, 0, 0
    for row in rows:
        items += 1
        probed += row.get("probed", True)
        flagged += row["text_solvable"]
        category = row.get("category") or "other"
        by_category[category]["items"] += 1
        by_category[category]["probed"] += row.get("probed", True)
        by_category[category]["text_solvable"] += row["text_solvable"]
        for kind, (correct, total) in row["probe"].items():
            totals.add(kind, correct, total)
        deps.extend(t["dependence"] for t in row["traces"].values() if "dependence" in t)
        from_sampling += sum(t.get("real_logprob") == "sampled" for t in row["traces"].values())
        passed_over += len(row.get("passed_over", ()))
    acc = {k: round(a, 4) for k in totals.counts if (a := totals.accuracy(k)) is not None}
    cf_acc = totals.counterfactual_accuracy()
    cf_acc = None if cf_acc is None else round(cf_acc, 4)
    real = acc.get("real")
    return {
        "items": items,
        "items_probed": probed,
        "probe_accuracy": acc,
        "counterfactual_accuracy": cf_acc,
        "grounding_gap": None if real is None or cf_acc is None else round(real - cf_acc, 4),
        "grounding_gap_by_kind": {k: round(real - acc[k], 4) for k in kinds if real is not None and k in acc},
        "text_solvable": flagged,
        "text_solvable_share": round(flagged / probed, 4) if probed else None,
        "text_solvable_by_category": {c: dict(n) for c, n in sorted(by_category.items())},
        "traces_scored": len(deps),
        # Traces whose real-audio log-probability came from sampling (no teacher-forced pass) ...
        "traces_real_from_sampling": from_sampling,
        # ... and passing traces left unscored, as ones the filter's selection would not keep.
        "traces_passed_over": passed_over,
        "dependence": distribution(deps),
    }


def run(ctx: StageContext) -> dict | None:
    """The ground stage of the round (core/stages.py); None while other array tasks owe shards."""
    return ground_stage(ctx.cfg, ctx.data.train, ctx.model, ctx.rd, ctx.engines.get)
