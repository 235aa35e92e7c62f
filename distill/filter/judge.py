"""The LLM judge: an OpenAI-compatible chat endpoint scores a trace against a rubric.

The report used a judge to keep traces that reason over acoustic features and drop incoherent or
self-denying ones. Here the judge is any model served with an OpenAI-compatible API (for example
`vllm serve` of an audio LLM); the question, the audio (base64 WAV `input_audio` parts, at most
25 s each) and the trace go in, a line "Score: N" comes back. Calls run with bounded concurrency,
a timeout, and retries with exponential backoff; every outcome is a result, never an exception:
a score, or the reason there is none (timeout, HTTP error, a reply without a score).
"""

from __future__ import annotations

import re
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import numpy as np
from tqdm import tqdm

from distill.filter.config import JudgeConfig
from distill.openai_client import ChatClient, audio_parts

_SCORE = re.compile(r"score\s*[:=]\s*(\d+(?:\.\d+)?)", re.IGNORECASE)


@dataclass
class Verdict:
    score: float | None
    reason: (
        str | None
    )  # None when scored; else judge:timeout, judge:http_<code>, judge:error, judge:parse_error
    attempts: int
    reply: str = ""


def parse_score(reply: str) -> float | None:
    """The last 'Score: N' in a reply (a judge may reason first), or None."""
    found = _SCORE.findall(reply)
    return float(found[-1]) if found else None


def judge_messages(
    cfg: JudgeConfig, question: str, trace: str, audio: np.ndarray | None, sample_rate: int
) -> list:
    content: list[dict] = audio_parts(audio, sample_rate) if audio is not None else []
    content.append({"type": "text", "text": f"Question: {question}\n\nAnswer to grade:\n{trace}"})
    return [{"role": "system", "content": cfg.rubric}, {"role": "user", "content": content}]


class Judge:
    """A client of one judge endpoint."""

    def __init__(self, cfg: JudgeConfig, sleep: Callable[[float], None] = time.sleep):
        self.cfg = cfg
        try:
            self.client = ChatClient(cfg, sleep)
        except RuntimeError as exc:
            raise RuntimeError(f"judge: {exc} (filter.judge.model)") from None
        self.model = self.client.model

    def score(self, question: str, trace: str, audio: np.ndarray | None, sample_rate: int) -> Verdict:
        """Score one trace, retrying timeouts, connection errors and 5xx/429 answers."""
        body = {
            "max_tokens": self.cfg.max_tokens,
            "temperature": 0.0,
            "messages": judge_messages(
                self.cfg, question, trace, audio if self.cfg.send_audio else None, sample_rate
            ),
        }
        if self.cfg.score_regex:
            body["structured_outputs"] = {"regex": self.cfg.score_regex}
        reply = self.client.chat(body)
        if reply.body is None:
            return Verdict(None, f"judge:{reply.reason}", reply.attempts, reply.text)
        try:
            text = reply.body["choices"][0]["message"]["content"] or ""
        except (KeyError, IndexError, TypeError):  # not an OpenAI chat reply
            return Verdict(None, "judge:parse_error", reply.attempts, reply.text)
        value = parse_score(str(text))
        return Verdict(value, None if value is not None else "judge:parse_error", reply.attempts, str(text))

    def score_all(self, jobs: list[tuple[str, str, np.ndarray | None]], sample_rate: int) -> list[Verdict]:
        """Score (question, trace, audio) jobs with at most `concurrency` requests in flight."""
        with ThreadPoolExecutor(max_workers=self.cfg.concurrency) as pool:
            verdicts = pool.map(lambda job: self.score(job[0], job[1], job[2], sample_rate), jobs)
            return list(tqdm(verdicts, total=len(jobs), desc="judge", unit="trace", mininterval=1.0))

    def close(self) -> None:
        self.client.close()


def judge_result(verdict: Verdict, cfg: JudgeConfig) -> str | None:
    """The judge check's result: None (keep), judge:low_score, or the failure reason (kept anyway
    when filter.judge.on_error=keep)."""
    if verdict.score is not None:
        return None if verdict.score >= cfg.min_score else "judge:low_score"
    return None if cfg.on_error == "keep" else verdict.reason
