"""A client of an OpenAI-compatible chat endpoint (`vllm serve`, shared inference clusters), shared
by the LLM judge and the server rollout backend.

Audio goes as base64 WAV `input_audio` parts of at most 25 s (the Step-Audio client's chunk
size; servers refuse items near their 30 s window). Calls retry timeouts, connection errors and
5xx/429 answers with exponential backoff; a 4xx answer is not retried (a bad request stays bad).
The API key comes only from an environment variable, never from a config or a log.
"""

from __future__ import annotations

import base64
import io
import os
import time
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np

from data_pipelines.audio import split_chunks
from distill.filter.config import JudgeConfig
from distill.rollout.config import ServerConfig

MAX_CHUNK_SECONDS = 25.0


def wav_base64(audio: np.ndarray, sample_rate: int) -> str:
    import soundfile as sf

    buf = io.BytesIO()
    sf.write(buf, audio, sample_rate, format="WAV", subtype="PCM_16")
    return base64.b64encode(buf.getvalue()).decode()


def audio_parts(audio: np.ndarray, sample_rate: int, chunk_seconds: float = MAX_CHUNK_SECONDS) -> list[dict]:
    """`input_audio` content parts of a waveform, cut into pieces of at most `chunk_seconds`."""
    return [{"type": "input_audio", "input_audio": {"data": wav_base64(piece, sample_rate), "format": "wav"}}
            for piece in split_chunks(audio, int(chunk_seconds * sample_rate))]


@dataclass
class ChatReply:
    body: dict | None  # the parsed JSON reply of a 200 answer
    reason: str | None  # None on a 200 answer; else timeout, http_<code>, error
    attempts: int
    text: str = ""  # the raw reply (truncated), for error messages


class ChatClient:
    """httpx client of one endpoint, configured by a JudgeConfig or ServerConfig (base_url, model,
    api_key_env, timeout_s, retries, backoff_s); `model` "" takes the first model the server lists."""

    def __init__(self, endpoint: JudgeConfig | ServerConfig, sleep: Callable[[float], None] = time.sleep):
        import httpx

        self.base_url = endpoint.base_url.rstrip("/")
        self.retries = endpoint.retries
        self.backoff_s = endpoint.backoff_s
        self.sleep = sleep
        key = os.environ.get(endpoint.api_key_env, "")
        headers = {"Authorization": f"Bearer {key}"} if key else {}
        self.client = httpx.Client(base_url=self.base_url, headers=headers, timeout=endpoint.timeout_s)
        try:
            self.model = endpoint.model or self._first_model()
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
            raise RuntimeError(f"cannot list the models of {self.base_url} ({exc}); is the server up? "
                               "Name the model in the config to skip the lookup") from None

    def chat(self, body: dict) -> ChatReply:
        """POST /chat/completions (with "model" added), retrying what a retry may fix."""
        import httpx

        body = {"model": self.model, **body}
        reason = "error"
        for attempt in range(1, self.retries + 2):
            try:
                response = self.client.post("/chat/completions", json=body)
                if response.status_code == 200:
                    try:
                        return ChatReply(response.json(), None, attempt, response.text[:500])
                    except ValueError:
                        return ChatReply(None, "parse_error", attempt, response.text[:500])
                reason = f"http_{response.status_code}"
                if response.status_code < 500 and response.status_code != 429:
                    return ChatReply(None, reason, attempt, response.text[:500])
            except httpx.TimeoutException:
                reason = "timeout"
            except httpx.HTTPError:
                reason = "error"
            if attempt <= self.retries:
                self.sleep(self.backoff_s * 2 ** (attempt - 1))
        return ChatReply(None, reason, self.retries + 1)

    def close(self) -> None:
        self.client.close()
