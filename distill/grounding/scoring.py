"""Teacher-forced scoring of traces with vLLM `prompt_logprobs`: how much more likely a trace is
when the model hears the real audio than when it hears a counterfactual.

The prompt and the trace go in as one prompt; vLLM returns the log-probability of every prompt
token given the ones before it (one forward pass, no sampling). The trace's tokens are the tail
of that prompt: the tokens sampled, where the trace carries them, else its text tokenized after
the prompt (found with the tokenizer's character offsets), so a prompt whose audio placeholder
vLLM expands into hundreds of audio tokens still lines up.

The traces of one item scored against one counterfactual share its prompt (the question and the
counterfactual audio, hundreds of audio tokens for a real clip). vLLM skips its prefix cache for
requests with prompt_logprobs, because it returns no log-probability for a token whose position
the cache served; a job may ask to read it anyway (`ScoreJob.reuse_prefix`). Served positions in
the prompt are not needed. Where the cache also served the first tokens of the trace (traces that
begin alike), their log-probabilities are those of an earlier job of the same call with the same
tokens and audio up to there (a token's log-probability depends only on what precedes it); with no
such job (the blocks came from sampling, another call or shard) the trace is scored again without
the cache.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field

import numpy as np

from distill.core.prompts import THINK_CLOSE, reasoning_split
from distill.models.tokens import think_close_token_id
from distill.rollout.engine import engine_prompt, first_logprobs


@dataclass
class ScoreJob:
    prompt: str  # the chat prompt with one audio placeholder per chunk of `audio`
    completion: str  # the trace, from the generation prefix on
    audio: list[np.ndarray]
    # The completion's tokens as sampled: scored as they are (else the text is tokenized after the prompt).
    completion_ids: list[int] | None = None
    # Read vLLM's prefix cache (module docstring): a trace whose head the cache holds from a request
    # outside the call (a sampled trace, another call's scoring) is scored twice.
    reuse_prefix: bool = False


@dataclass
class PrefixDonors:
    """Scored prompts whose log-probabilities can stand in for positions vLLM's prefix cache served
    in a later job: per audio input (its arrays, the same objects for the same content: that pins
    the content without hashing it), each scored prompt's token ids and its log-probability per
    position (None where the cache served it). `counts`: jobs whose trace head was filled from a donor
    ("filled") or scored again without the cache ("rescored"), and prompt tokens the cache served
    ("reused")."""

    # Keyed by audio_key; each entry holds its audio, so its arrays' ids stay theirs.
    by_audio: dict[tuple[int, ...], list[tuple[list, list[int], list[float | None]]]] = field(
        default_factory=dict
    )
    counts: Counter = field(default_factory=Counter)

    def add(self, audio: list, ids: list[int], values: list[float | None]) -> None:
        self.by_audio.setdefault(audio_key(audio), []).append((audio, ids, values))

    def complete(self, audio: list, ids: list[int], values: list[float | None], start: int) -> int | None:
        """Fill the positions from `start` (the trace's) of `values` that the prefix cache served
        from a donor; None when none is missing now, else the end of the positions still missing
        (no donor has them: the job must be scored again without the cache)."""
        missing = [p for p in range(start, len(values)) if values[p] is None]
        if not missing:
            return None
        head = self.fill(audio, ids, start, missing[-1] + 1)
        if head is None:
            return missing[-1] + 1
        values[start : missing[-1] + 1] = head
        self.counts["filled"] += 1
        return None

    def fill(self, audio: list, ids: list[int], start: int, end: int) -> list[float] | None:
        """Log-probabilities of positions start..end-1 of prompt `ids` from a scored prompt with the
        same audio and the same tokens up to end-1 that computed them (None: no such prompt)."""
        for _, donor_ids, values in self.by_audio.get(audio_key(audio), ()):
            if (
                len(donor_ids) >= end
                and donor_ids[:end] == ids[:end]
                and all(v is not None for v in values[start:end])
            ):
                return values[start:end]
        return None


def audio_key(audio: list) -> tuple[int, ...]:
    """The identity of an audio input's arrays (not their content): two live inputs have the same
    key only if they hold the same arrays."""
    return tuple(map(id, audio))


@dataclass
class TraceLogprobs:
    reasoning: list[float]  # per token, up to and including </think>
    answer: list[float]  # per token after </think>

    @property
    def total(self) -> float:
        return sum(self.reasoning) + sum(self.answer)

    def sums(self) -> LogprobSums:
        return LogprobSums(sum(self.reasoning), sum(self.answer), len(self.reasoning), len(self.answer))


@dataclass(frozen=True)
class LogprobSums:
    """A trace's log-probability summed over its reasoning and over its answer: what audio
    dependence compares, from a teacher-forced pass or from sampling (rollout/sample.py)."""

    reasoning: float
    answer: float
    reasoning_tokens: int
    answer_tokens: int

    @property
    def total(self) -> float:
        return self.reasoning + self.answer


def completion_tokens(tokenizer, prompt: str, completion: str) -> tuple[list[int], int]:
    """(token ids of the completion as the model reads them after the prompt, how many of them
    belong to the reasoning: up to the end of the last `</think>`, all of them without one)."""
    enc = tokenizer(prompt + completion, add_special_tokens=False, return_offsets_mapping=True)
    cut = len(prompt)
    first = next(
        (i for i, (start, _) in enumerate(enc["offset_mapping"]) if start >= cut), len(enc["input_ids"])
    )
    ids = enc["input_ids"][first:]
    close = completion.rfind(THINK_CLOSE)
    if close < 0:
        return ids, len(ids)
    close_end = cut + close + len(THINK_CLOSE)
    reasoning = sum(1 for start, _ in enc["offset_mapping"][first:] if start < close_end)
    return ids, reasoning


def score(
    llm, tokenizer, jobs: list[ScoreJob], sample_rate: int, counts: Counter | None = None
) -> list[TraceLogprobs]:
    """The log-probability of each job's completion tokens given its prompt and audio. Jobs that
    read the prefix cache take served trace heads from the call's other jobs, so a call holds no
    more than its own outputs (module docstring); `counts` adds up PrefixDonors.counts."""
    if not jobs:
        return []
    donors = PrefixDonors(counts=Counter() if counts is None else counts)
    think_close = think_close_token_id(tokenizer)
    spans, prompts = [], []
    for j in jobs:
        if j.completion_ids is None:
            spans.append(completion_tokens(tokenizer, j.prompt, j.completion))
            prompts.append(engine_prompt(j.prompt + j.completion, j.audio, sample_rate))
        else:
            spans.append((j.completion_ids, reasoning_split(j.completion_ids, think_close)))
            # The prompt tokenized as vLLM tokenizes a text prompt; vLLM expands its audio placeholders.
            prompts.append(
                {
                    "prompt_token_ids": tokenizer.encode(j.prompt) + list(j.completion_ids),
                    "multi_modal_data": {"audio": [(a, sample_rate) for a in j.audio]},
                }
            )
    scored = prompt_values(llm, prompts, [not j.reuse_prefix for j in jobs])
    starts = []
    for job, (ids, _), (prompt_ids, values) in zip(jobs, spans, scored, strict=True):
        starts.append(len(prompt_ids) - len(ids))
        if prompt_ids[starts[-1] :] != ids:
            raise RuntimeError(
                f"scoring: vLLM tokenized the trace differently from the tokenizer "
                f"({prompt_ids[starts[-1] : starts[-1] + 8]} vs {ids[:8]}); trace starts "
                f"{job.completion[:60]!r}"
            )
        if job.reuse_prefix:
            donors.counts["reused"] += sum(v is None for v in values[1 : starts[-1]])
    # Jobs the cache served into the trace, with no donor yet, are scored again without the cache
    # in waves: one of those that need the same head per wave, the others filled from it after.
    pending = [i for i, j in enumerate(jobs) if j.reuse_prefix]
    while pending:
        wave, wait = [], []
        for i in pending:
            prompt_ids, values = scored[i]
            end = donors.complete(jobs[i].audio, prompt_ids, values, starts[i])
            if end is None:
                donors.add(jobs[i].audio, prompt_ids, values)
            elif any(
                audio_key(jobs[w].audio) == audio_key(jobs[i].audio)
                and scored[w][0][:end] == prompt_ids[:end]
                for w in wave
            ):
                wait.append(i)
            else:
                wave.append(i)
        for i, result in zip(
            wave, prompt_values(llm, [prompts[i] for i in wave], [True] * len(wave)), strict=True
        ):
            scored[i] = result
            donors.add(jobs[i].audio, *result)
        donors.counts["rescored"] += len(wave)
        pending = wait
    result = []
    for (ids, reasoning), (_, values) in zip(spans, scored, strict=True):
        trace = values[len(values) - len(ids) :]
        result.append(TraceLogprobs(trace[:reasoning], trace[reasoning:]))
    return result


def prompt_values(
    llm, prompts: list[dict], skip_cache: list[bool]
) -> list[tuple[list[int], list[float | None]]]:
    """(prompt token ids, log-probability per position, None where vLLM computed none) of each
    prompt: not position 0, nor positions the prefix cache served (without `skip_cache`)."""
    from vllm import SamplingParams

    if not prompts:
        return []
    # max_tokens=1 is vLLM's minimum; the one generated token is ignored. prompt_logprobs=0 returns
    # the log-probability of each prompt token itself (raw model output, before any sampling).
    # flat_logprobs: a few flat lists per request instead of one dict per prompt token.
    params = [
        SamplingParams(
            max_tokens=1,
            temperature=0.0,
            prompt_logprobs=0,
            detokenize=False,
            flat_logprobs=True,
            skip_reading_prefix_cache=skip,
        )
        for skip in skip_cache
    ]
    result = []
    for out in llm.generate(prompts, params, use_tqdm=True):
        # Position p's log-probability comes from the logits at p - 1: with the cache serving
        # positions 0..cached-1, positions 1..cached have none (vLLM leaves them unset).
        cached = out.num_cached_tokens or 0
        values: list[float | None] = [None, *first_logprobs(out.prompt_logprobs[1:])]
        values[1 : cached + 1] = [None] * min(cached, len(values) - 1)
        result.append((list(out.prompt_token_ids), values))
    return result


@dataclass
class Dependence:
    """How much a trace depends on the audio against one counterfactual: log-probability gained
    from the real audio, per reasoning token (nats/token) and over the whole answer (nats)."""

    reasoning: float
    answer: float


def dependence(real: LogprobSums, counter: LogprobSums) -> Dependence:
    """Real-audio minus counterfactual log-probabilities of the same tokens."""
    if (real.reasoning_tokens, real.answer_tokens) != (counter.reasoning_tokens, counter.answer_tokens):
        raise ValueError("dependence: the two scorings cover different tokens")
    gain = real.reasoning - counter.reasoning
    return Dependence(reasoning=gain / max(1, real.reasoning_tokens), answer=real.answer - counter.answer)
