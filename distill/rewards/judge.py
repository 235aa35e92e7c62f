"""The LLM judge: an OpenAI-compatible chat endpoint scores a trace against a rubric.

The report used a judge to keep traces that reason over acoustic features and drop incoherent or
self-denying ones. Here the judge is any model served with an OpenAI-compatible API (for example
`vllm serve` of an audio LLM); the question, the audio (base64 WAV `input_audio` parts, at most
25 s each) and the trace go in, a line "Score: N" comes back. Calls run with bounded concurrency,
a timeout, and retries with exponential backoff; every outcome is a result, never an exception:
a score, or the reason there is none (timeout, HTTP error, a reply without a score).
"""

from __future__ import annotations

import base64
import io
import os
import re
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import numpy as np
from tqdm import tqdm

from data_pipelines.audio import split_chunks
from distill.config import JudgeConfig

_SCORE = re.compile(r"score\s*[:=]\s*(\d+(?:\.\d+)?)", re.IGNORECASE)
MAX_CHUNK_SECONDS = 25.0  # the Step-Audio client's chunk size; servers refuse items near 30 s


@dataclass
class Verdict:
    score: float | None
    reason: str | None  # None when scored; else judge:timeout, judge:http_<code>, judge:error, judge:parse_error
    attempts: int
    reply: str = ""


def parse_score(reply: str) -> float | None:
    """The last 'Score: N' in a reply (a judge may reason first), or None."""
    found = _SCORE.findall(reply)
    return float(found[-1]) if found else None


def wav_base64(audio: np.ndarray, sample_rate: int) -> str:
    import soundfile as sf

    buf = io.BytesIO()
    sf.write(buf, audio, sample_rate, format="WAV", subtype="PCM_16")
    return base64.b64encode(buf.getvalue()).decode()


def judge_messages(cfg: JudgeConfig, question: str, trace: str, audio: np.ndarray | None, sample_rate: int) -> list:
    content: list[dict] = []
    if audio is not None:
        for piece in split_chunks(audio, int(MAX_CHUNK_SECONDS * sample_rate)):
            content.append({"type": "input_audio", "input_audio": {"data": wav_base64(piece, sample_rate),
                                                                   "format": "wav"}})
    content.append({"type": "text", "text": f"Question: {question}\n\nAnswer to grade:\n{trace}"})
    return [{"role": "system", "content": cfg.rubric}, {"role": "user", "content": content}]


class Judge:
    """A client of one judge endpoint (httpx; the API key, if any, only from the environment)."""

    def __init__(self, cfg: JudgeConfig, sleep: Callable[[float], None] = time.sleep):
        import httpx

        self.cfg = cfg
        self.sleep = sleep
        key = os.environ.get(cfg.api_key_env, "")
        headers = {"Authorization": f"Bearer {key}"} if key else {}
        self.client = httpx.Client(base_url=cfg.base_url.rstrip("/"), headers=headers, timeout=cfg.timeout_s)
        try:
            self.model = cfg.model or self._first_model()
        except BaseException:
            self.client.close()
            raise

    def _first_model(self) -> str:
        import httpx

        try:
            response = self.client.get("/models")
            response.raise_for_status()
            return response.json()["data"][0]["id"]
        except (httpx.HTTPError, KeyError, IndexError, TypeError, ValueError) as exc:
            raise RuntimeError(f"judge: cannot list the models of {self.cfg.base_url} ({exc}); is the server up? "
                               "Set filter.judge.model to skip the lookup") from None

    def score(self, question: str, trace: str, audio: np.ndarray | None, sample_rate: int) -> Verdict:
        """Score one trace, retrying timeouts, connection errors and 5xx/429 answers."""
        import httpx

        body = {"model": self.model, "max_tokens": self.cfg.max_tokens, "temperature": 0.0,
                "messages": judge_messages(self.cfg, question, trace, audio if self.cfg.send_audio else None,
                                           sample_rate)}
        if self.cfg.score_regex:
            body["structured_outputs"] = {"regex": self.cfg.score_regex}
        reason = "judge:error"
        for attempt in range(1, self.cfg.retries + 2):
            try:
                response = self.client.post("/chat/completions", json=body)
                if response.status_code == 200:
                    try:
                        reply = response.json()["choices"][0]["message"]["content"] or ""
                    except (KeyError, IndexError, TypeError, ValueError):  # not an OpenAI chat reply
                        return Verdict(None, "judge:parse_error", attempt, response.text[:500])
                    value = parse_score(str(reply))
                    return Verdict(value, None if value is not None else "judge:parse_error", attempt, str(reply))
                reason = f"judge:http_{response.status_code}"
                if response.status_code < 500 and response.status_code != 429:
                    return Verdict(None, reason, attempt, response.text[:500])  # a bad request stays bad
            except httpx.TimeoutException:
                reason = "judge:timeout"
            except httpx.HTTPError:
                reason = "judge:error"
            if attempt <= self.cfg.retries:
                self.sleep(self.cfg.backoff_s * 2 ** (attempt - 1))
        return Verdict(None, reason, self.cfg.retries + 1)

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
