"""A client of an OpenAI-compatible chat endpoint (`vllm serve`, shared inference clusters), shared
by the LLM judge and the server rollout backend, on the OpenAI Python SDK.

Audio goes as base64 WAV `input_audio` parts of at most 25 s (the Step-Audio client's chunk
size; servers refuse items near their 30 s window). Calls retry timeouts, connection errors and
5xx/429 answers with exponential backoff; a 4xx answer is not retried (a bad request stays bad).
The retries are this module's, not the SDK's (its `max_retries` is 0): the SDK's backoff is its own
(0.5 s doubling to 8 s, with jitter) and reports no attempt count, while the configs' `retries` and
`backoff_s` promise waits of backoff_s, 2 backoff_s, 4 backoff_s, ... and verdicts count attempts.
The API key comes only from the environment variable the config names, never from a config or a
log, and never from the SDK's own variables (OPENAI_API_KEY, OPENAI_ORG_ID, OPENAI_PROJECT_ID, an
Authorization in OPENAI_CUSTOM_HEADERS): an endpoint is not sent the credentials of another.
"""

from __future__ import annotations

import base64
import io
import json
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
    return [
        {"type": "input_audio", "input_audio": {"data": wav_base64(piece, sample_rate), "format": "wav"}}
        for piece in split_chunks(audio, int(chunk_seconds * sample_rate))
    ]


@dataclass
class ChatReply:
    body: dict | None  # the parsed JSON reply of a 200 answer
    reason: str | None  # None on a 200 answer; else timeout, http_<code>, error, parse_error
    attempts: int
    text: str = ""  # the raw reply (truncated), for error messages


class ChatClient:
    """OpenAI SDK client of one endpoint, configured by a JudgeConfig or ServerConfig (base_url,
    model, api_key_env, timeout_s, retries, backoff_s); `model` "" takes the first model the server
    lists. One client serves many threads (the callers' pools of `concurrency` workers)."""

    def __init__(self, endpoint: JudgeConfig | ServerConfig, sleep: Callable[[float], None] = time.sleep):
        from openai import Omit, OpenAI

        self.base_url = endpoint.base_url.rstrip("/")
        self.retries = endpoint.retries
        self.backoff_s = endpoint.backoff_s
        self.sleep = sleep
        key = os.environ.get(endpoint.api_key_env, "")
        # Per request, so that it overrides any Authorization of OPENAI_CUSTOM_HEADERS; no key, no header.
        self.headers = {"Authorization": f"Bearer {key}" if key else Omit()}
        self.client = OpenAI(
            base_url=self.base_url,
            api_key=key or "unused",
            timeout=endpoint.timeout_s,
            max_retries=0,
            default_headers={"OpenAI-Organization": Omit(), "OpenAI-Project": Omit()},
        )
        try:
            self.model = endpoint.model or self._first_model()
        except BaseException:
            self.client.close()
            raise

    def _first_model(self) -> str:
        import openai

        try:
            return self.client.models.list(extra_headers=self.headers).data[0].id
        except (openai.OpenAIError, AttributeError, IndexError, TypeError, ValueError) as exc:
            raise RuntimeError(
                f"cannot list the models of {self.base_url} ({exc}); is the server up? "
                "Name the model in the config to skip the lookup"
            ) from None

    def chat(self, body: dict) -> ChatReply:
        """POST /chat/completions (with "model" added), retrying what a retry may fix.

        `body` goes as the request's JSON as it is, vLLM's own fields (continue_final_message,
        stop_token_ids, structured_outputs, ...) beside the OpenAI ones, through the SDK's plain
        `post` (its documented way to any endpoint): `chat.completions.create` would take the vLLM
        fields as `extra_body` the same, but first walks the messages against its typed schema,
        about 1 ms of CPU a request with audio parts (bench/server_client.py), for nothing here.
        The answer is read as text and parsed here, so a 200 answer that is no chat completion is a
        parse_error with its text, and callers read the reply as the dict the server sent."""
        import openai

        body = {"model": self.model, **body}
        reason = "error"
        for attempt in range(1, self.retries + 2):
            try:
                text = self.client.post(
                    "/chat/completions", cast_to=str, body=body, options={"headers": self.headers}
                )
                try:
                    return ChatReply(json.loads(text), None, attempt, text[:500])
                except ValueError:
                    return ChatReply(None, "parse_error", attempt, text[:500])
            except openai.APITimeoutError:
                reason = "timeout"
            except openai.APIStatusError as exc:
                reason = f"http_{exc.status_code}"
                if exc.status_code < 500 and exc.status_code != 429:
                    return ChatReply(None, reason, attempt, exc.response.text[:500])
            except openai.APIConnectionError:
                reason = "error"
            if attempt <= self.retries:
                self.sleep(self.backoff_s * 2 ** (attempt - 1))
        return ChatReply(None, reason, self.retries + 1)

    def close(self) -> None:
        self.client.close()
