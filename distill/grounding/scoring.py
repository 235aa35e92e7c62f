"""Teacher-forced scoring of traces with vLLM `prompt_logprobs`: how much more likely a trace is
when the model hears the real audio than when it hears a counterfactual.

The prompt and the trace go in as one prompt; vLLM returns the log-probability of every prompt
token given the ones before it (one forward pass, no sampling). The trace's tokens are the tail
of that prompt: the tokens sampled, where the trace carries them, else its text tokenized after
the prompt (found with the tokenizer's character offsets), so a prompt whose audio placeholder
vLLM expands into hundreds of audio tokens still lines up.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from distill.prompting import THINK_CLOSE, reasoning_split, think_close_token_id
from distill.rollout.engine import engine_prompt, first_logprobs


@dataclass
class ScoreJob:
    prompt: str  # the chat prompt with one audio placeholder per chunk of `audio`
    completion: str  # the trace, from the generation prefix on
    audio: list[np.ndarray]
    # The completion's tokens as sampled: scored as they are (else the text is tokenized after the prompt).
    completion_ids: list[int] | None = None


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
    first = next((i for i, (start, _) in enumerate(enc["offset_mapping"]) if start >= cut),
                 len(enc["input_ids"]))
    ids = enc["input_ids"][first:]
    close = completion.rfind(THINK_CLOSE)
    if close < 0:
        return ids, len(ids)
    close_end = cut + close + len(THINK_CLOSE)
    reasoning = sum(1 for start, _ in enc["offset_mapping"][first:] if start < close_end)
    return ids, reasoning


def score(llm, tokenizer, jobs: list[ScoreJob], sample_rate: int) -> list[TraceLogprobs]:
    """The log-probability of each job's completion tokens given its prompt and audio."""
    from vllm import SamplingParams

    if not jobs:
        return []
    think_close = think_close_token_id(tokenizer)
    spans, prompts = [], []
    for j in jobs:
        if j.completion_ids is None:
            spans.append(completion_tokens(tokenizer, j.prompt, j.completion))
            prompts.append(engine_prompt(j.prompt + j.completion, j.audio, sample_rate))
        else:
            spans.append((j.completion_ids, reasoning_split(j.completion_ids, think_close)))
            # The prompt tokenized as vLLM tokenizes a text prompt; vLLM expands its audio placeholders.
            prompts.append({"prompt_token_ids": tokenizer.encode(j.prompt) + list(j.completion_ids),
                            "multi_modal_data": {"audio": [(a, sample_rate) for a in j.audio]}})
    # max_tokens=1 is vLLM's minimum; the one generated token is ignored. prompt_logprobs=0 returns
    # the log-probability of each prompt token itself (raw model output, before any sampling).
    # flat_logprobs: a few flat lists per request instead of one dict per prompt token.
    params = SamplingParams(max_tokens=1, temperature=0.0, prompt_logprobs=0, detokenize=False, flat_logprobs=True)
    outs = llm.generate(prompts, params, use_tqdm=True)
    result = []
    for job, (ids, reasoning), out in zip(jobs, spans, outs, strict=True):
        tail = list(out.prompt_token_ids[len(out.prompt_token_ids) - len(ids):])
        if tail != ids:
            raise RuntimeError(f"scoring: vLLM tokenized the trace differently from the tokenizer ({tail[:8]} vs "
                               f"{ids[:8]}); trace starts {job.completion[:60]!r}")
        values = list(first_logprobs(out.prompt_logprobs[len(out.prompt_logprobs) - len(ids):]))
        result.append(TraceLogprobs(values[:reasoning], values[reasoning:]))
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
