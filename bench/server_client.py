"""Benchmark: sampling throughput (output tokens/s) from an OpenAI-compatible vLLM server through
distill's ChatClient on the OpenAI SDK, against the hand-rolled httpx client it replaced (inlined
below as the baseline), on the same requests in the same run.

    .venv/bin/python bench/server_client.py [--model DIR] [--items 32] [--n 2] [--max-tokens 128]
        [--concurrency 4] [--rounds 8] [--warmup 2] [--stub-requests 400] [--no-async]
        [--out bench/results/server_client.json]

- vllm: `python -m vllm.entrypoints.openai.api_server` on the tiny test model (built as the tests
  build it, unless --model names one), the flags tests/serving.py gives its servers. Each request is
  a server-rollout request (distill.rollout.server.item_body: system prompt, a 2 s tone as a base64
  WAV part, the question, the pre-filled assistant turn, n choices) with vLLM's `ignore_eos`, so
  every choice is max_tokens long and every client asks for the same work. The requests go as
  sample_shard sends them, `concurrency` at a time from a thread pool; the clients take turns,
  `rounds` times in rotating order after `warmup` batches each; each client's median round and
  its best are reported (the best is the steadier on a shared machine). Every batch has tones of its
  own (no run reuses what the server cached for another).
  The server's own count of the tokens it generated (/metrics vllm:generation_tokens_total) is
  checked against what the clients asked for.
- stub: the same requests to a stand-in endpoint on localhost that answers each with a fixed chat
  completion at once: the clients' own cost per request (building and sending a ~90 kB JSON body,
  reading the answer), which the vLLM numbers, bound by the tiny model on CPU, can hide.
- clients: httpx_old (the baseline), openai_sdk_new (distill.openai_client.ChatClient: the SDK's
  `post`), openai_sdk_typed_create (the SDK's chat.completions.create with vLLM's fields as
  extra_body, which ChatClient does not use), openai_sdk_async (AsyncOpenAI's `post` under an
  asyncio.Semaphore(concurrency) instead of the thread pool: would moving the call sites to
  asyncio pay?).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from data_pipelines.items import Item
from distill.config import load_config
from distill.openai_client import ChatClient, ChatReply
from distill.rollout.config import ServerConfig
from distill.rollout.server import item_body
from distill.training.launch import free_port


class HttpxChatClient:
    """The baseline: distill/openai_client.py's ChatClient before the SDK (`git show ee24c2c~1:
    distill/openai_client.py`), verbatim but for its name and sleep, with the reply checked as the
    callers do."""

    def __init__(self, endpoint: ServerConfig, sleep: Callable[[float], None] = time.sleep):
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
            raise RuntimeError(
                f"cannot list the models of {self.base_url} ({exc}); is the server up? "
                "Name the model in the config to skip the lookup"
            ) from None

    def old_chat(self, body: dict) -> ChatReply:
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

    def chat(self, body: dict) -> dict:
        reply = self.old_chat(body)
        if reply.body is None:
            raise RuntimeError(f"{reply.reason}: {reply.text[:200]}")
        return reply.body

    def close(self) -> None:
        self.client.close()


class SdkChatClient:
    """The new client: distill.openai_client.ChatClient, with the reply checked as the callers do."""

    def __init__(self, endpoint: ServerConfig):
        self.inner = ChatClient(endpoint)

    def chat(self, body: dict) -> dict:
        reply = self.inner.chat(body)
        if reply.body is None:
            raise RuntimeError(f"{reply.reason}: {reply.text[:200]}")
        return reply.body

    def close(self) -> None:
        self.inner.close()


class SdkCreateChatClient:
    """The road not taken: chat.completions.create (typed arguments, vLLM's fields as extra_body),
    the raw answer's JSON as the reply, on ChatClient's SDK client."""

    def __init__(self, endpoint: ServerConfig):
        import inspect

        from openai.resources.chat.completions import Completions

        self.inner = ChatClient(endpoint)
        self.known = set(inspect.signature(Completions.create).parameters) - {
            "self",
            "model",
            "stream",
            "extra_headers",
            "extra_query",
            "extra_body",
            "timeout",
        }

    def chat(self, body: dict) -> dict:
        raw = self.inner.client.chat.completions.with_raw_response.create(
            model=self.inner.model,
            **{k: v for k, v in body.items() if k in self.known},
            extra_body={k: v for k, v in body.items() if k not in self.known},
            extra_headers=self.inner.headers,
        )
        return json.loads(raw.http_response.text)

    def close(self) -> None:
        self.inner.close()


def run_threads(client, bodies: list[dict], concurrency: int) -> tuple[float, int]:
    """Seconds for all requests, `concurrency` in flight from a thread pool (as sample_shard does),
    and the output tokens the replies report."""
    start = time.perf_counter()
    with ThreadPoolExecutor(max_workers=concurrency) as pool:
        replies = list(pool.map(client.chat, bodies))
    seconds = time.perf_counter() - start
    return seconds, sum(r["usage"]["completion_tokens"] for r in replies)


def run_async(endpoint: ServerConfig, model: str, bodies: list[dict], concurrency: int) -> tuple[float, int]:
    """The same requests through AsyncOpenAI (as ChatClient sends them: the SDK's post) with a
    semaphore of `concurrency`."""
    from openai import AsyncOpenAI, Omit

    async def main() -> tuple[float, int]:
        client = AsyncOpenAI(
            base_url=endpoint.base_url,
            api_key="unused",
            timeout=endpoint.timeout_s,
            max_retries=0,
            default_headers={"OpenAI-Organization": Omit(), "OpenAI-Project": Omit()},
        )
        gate = asyncio.Semaphore(concurrency)

        async def one(body: dict) -> dict:
            async with gate:
                text = await client.post(
                    "/chat/completions",
                    cast_to=str,
                    body={"model": model, **body},
                    options={"headers": {"Authorization": Omit()}},
                )
                return json.loads(text)

        start = time.perf_counter()
        replies = await asyncio.gather(*(one(b) for b in bodies))
        seconds = time.perf_counter() - start
        await client.close()
        return seconds, sum(r["usage"]["completion_tokens"] for r in replies)

    return asyncio.run(main())


def requests(n_items: int, n: int, max_tokens: int, batch: int = 0) -> list[dict]:
    """`n_items` server-rollout requests; each `batch` has tones of its own frequencies (so a round
    finds no audio or prefix the server has cached), and every batch the same lengths."""
    cfg = load_config("configs/demo_cpu.yaml", [f"sample.n={n}", f"sample.max_tokens={max_tokens}"])
    rate = cfg.data.sample_rate
    bodies = []
    for i in range(n_items):
        t = np.arange(2 * rate) / rate
        tone = (0.3 * np.sin(2 * np.pi * (300 + 7 * i + 0.5 * batch) * t)).astype(np.float32)
        item = Item(
            id=f"b{i}", audio="-", question="Is the tone high or low?", answer="high", choices=["high", "low"]
        )
        bodies.append({**item_body(cfg, item, [tone], seed=i), "ignore_eos": True})
    return bodies


def generation_tokens(base_url: str) -> float | None:
    """The server's own count of generated tokens (Prometheus /metrics), or None."""
    import httpx

    try:
        text = httpx.get(base_url.removesuffix("/v1") + "/metrics", timeout=10).text
    except httpx.HTTPError:
        return None
    values = [
        float(line.split()[-1])
        for line in text.splitlines()
        if line.startswith("vllm:generation_tokens_total")
    ]
    return sum(values) if values else None


def start_server(
    model: Path, port: int, log: Path, max_model_len: int = 1024, extra: tuple[str, ...] = ()
) -> subprocess.Popen:
    """As tests/serving.py starts its servers (chunked prefill off: seeded requests crash vLLM's
    CPU sampler when a prefill is chunked)."""
    import httpx

    proc = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "vllm.entrypoints.openai.api_server",
            "--model",
            str(model),
            "--port",
            str(port),
            "--host",
            "127.0.0.1",
            "--kv-cache-memory-bytes",
            str(256 << 20),
            "--enforce-eager",
            "--served-model-name",
            "teacher",
            "--max-model-len",
            str(max_model_len),
            "--no-enable-chunked-prefill",
            *extra,
        ],
        stdout=log.open("w"),
        stderr=subprocess.STDOUT,
    )
    deadline = time.time() + 300
    while True:
        if proc.poll() is not None:
            raise RuntimeError(f"vllm serve died: {log.read_text()[-3000:]}")
        try:
            if httpx.get(f"http://127.0.0.1:{port}/v1/models", timeout=2).status_code == 200:
                return proc
        except httpx.HTTPError:
            pass
        if time.time() > deadline:
            proc.kill()
            raise RuntimeError("vllm serve did not come up")
        time.sleep(1)


def stub_endpoint(n: int, max_tokens: int) -> tuple[ThreadingHTTPServer, str]:
    """A stand-in chat endpoint: a fixed reply with n choices of max_tokens words, at once."""
    text = " ".join(["tone"] * max_tokens)
    reply = json.dumps(
        {
            "id": "x",
            "object": "chat.completion",
            "created": 0,
            "model": "teacher",
            "choices": [
                {"index": j, "message": {"role": "assistant", "content": text}, "finish_reason": "length"}
                for j in range(n)
            ],
            "usage": {
                "prompt_tokens": 100,
                "completion_tokens": n * max_tokens,
                "total_tokens": 100 + n * max_tokens,
            },
        }
    ).encode()

    # One write per answer, no Nagle: a head and a body written apart wait out the client's delayed ACK.
    answer = (
        b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\n"
        + f"Content-Length: {len(reply)}\r\n\r\n".encode()
        + reply
    )

    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"  # keep-alive, as vLLM's server
        disable_nagle_algorithm = True

        def do_POST(self):  # http.server names the methods
            self.rfile.read(int(self.headers["Content-Length"]))
            self.wfile.write(answer)

        def log_message(self, *args):
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    server.daemon_threads = True
    threading.Thread(target=server.serve_forever, daemon=True).start()
    return server, f"http://127.0.0.1:{server.server_port}/v1"


def compare(
    endpoint: ServerConfig,
    batches: Callable[[int], list[dict]],
    concurrency: int,
    rounds: int,
    with_async: bool,
    warmup: int,
) -> dict:
    """Each client's `rounds` over a batch of requests, the clients taking turns (their order
    rotating), after `warmup` batches each; batch k = batches(k), a new one for every run."""
    clients = {
        "httpx_old": HttpxChatClient(endpoint),
        "openai_sdk_new": SdkChatClient(endpoint),
        "openai_sdk_typed_create": SdkCreateChatClient(endpoint),
    }
    model = clients["httpx_old"].model
    names = [*clients, *(["openai_sdk_async"] * with_async)]

    def run(name: str, bodies: list[dict]) -> tuple[float, int]:
        if name == "openai_sdk_async":
            return run_async(endpoint, model, bodies, concurrency)
        return run_threads(clients[name], bodies, concurrency)

    k = 0
    for _ in range(warmup):  # connections; the server's first batches run slower
        for name in names:
            run(name, batches(k))
            k += 1
    runs: dict[str, list[tuple[float, int]]] = {name: [] for name in names}
    for r in range(rounds):
        for name in names[r % len(names) :] + names[: r % len(names)]:
            runs[name].append(run(name, batches(k)))
            k += 1
    for client in clients.values():
        client.close()
    result = {}
    for name, rs in runs.items():
        tokens = {t for _, t in rs}
        assert len(tokens) == 1, f"{name}: the rounds generated different token counts {tokens}"
        secs = [s for s, _ in rs]
        count = tokens.pop()
        result[name] = {
            "tokens_per_s": round(count / statistics.median(secs), 1),
            "tokens_per_s_best_round": round(count / min(secs), 1),
            "requests_per_s": round(len(batches(0)) / statistics.median(secs), 1),
            "round_seconds": [round(s, 3) for s in secs],
        }
    for name in names[1:]:
        short = name.removeprefix("openai_sdk_")
        for key, label in (("tokens_per_s", ""), ("tokens_per_s_best_round", "_best_round")):
            result[f"ratio_{short}_over_old{label}"] = round(result[name][key] / result["httpx_old"][key], 3)
    return result


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument(
        "--model", help="a model folder vLLM serves (default: a tiny model built in a temp folder)"
    )
    ap.add_argument("--items", type=int, default=32, help="requests per round on the vLLM server")
    ap.add_argument("--n", type=int, default=2, help="choices per request (sample.n)")
    ap.add_argument("--max-tokens", type=int, default=128)
    ap.add_argument("--concurrency", type=int, default=4)
    ap.add_argument("--rounds", type=int, default=8)
    ap.add_argument("--warmup", type=int, default=2, help="untimed batches per client first")
    ap.add_argument(
        "--stub-requests", type=int, default=400, help="requests per round on the stand-in endpoint"
    )
    ap.add_argument("--no-async", action="store_true", help="skip the AsyncOpenAI variant")
    ap.add_argument("--out", default="bench/results/server_client.json")
    args = ap.parse_args()
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    import openai

    bodies = requests(args.items, args.n, args.max_tokens)
    result: dict = {
        "machine": f"{platform.machine()}, {os.cpu_count()} CPU cores, Python {platform.python_version()}, "
        f"openai {openai.__version__}",
        "load_average_at_start": [round(x, 2) for x in os.getloadavg()],
        "request": {
            "n": args.n,
            "max_tokens": args.max_tokens,
            "ignore_eos": True,
            "audio_seconds": 2,
            "body_bytes": len(json.dumps(bodies[0])),
            "concurrency": args.concurrency,
            "rounds": args.rounds,
            "warmup_rounds": args.warmup,
        },
    }

    server, url = stub_endpoint(args.n, args.max_tokens)
    stub_bodies = [bodies[i % len(bodies)] for i in range(args.stub_requests)]
    result["stub"] = {
        "requests_per_round": len(stub_bodies),
        **compare(
            ServerConfig(base_url=url, model="teacher"),
            lambda k: stub_bodies,
            args.concurrency,
            args.rounds,
            not args.no_async,
            args.warmup,
        ),
    }
    server.shutdown()
    print(json.dumps(result["stub"], indent=2), flush=True)

    with tempfile.TemporaryDirectory() as tmp:
        model = Path(args.model) if args.model else None
        if model is None:
            from distill.models.registry import build_tiny_model

            model = build_tiny_model(Path(tmp) / "tiny")
        port = free_port()
        proc = start_server(model, port, Path(tmp) / "serve.log")
        try:
            endpoint = ServerConfig(base_url=f"http://127.0.0.1:{port}/v1", timeout_s=600)
            before = generation_tokens(endpoint.base_url)
            start = time.perf_counter()
            made: dict[int, list[dict]] = {}

            def batch(k: int) -> list[dict]:  # made ahead of its run, outside the timing
                return made.setdefault(k, requests(args.items, args.n, args.max_tokens, k + 1))

            for k in range((3 + (not args.no_async)) * (args.rounds + args.warmup)):
                batch(k)
            vllm = compare(endpoint, batch, args.concurrency, args.rounds, not args.no_async, args.warmup)
            seconds = time.perf_counter() - start
            after = generation_tokens(endpoint.base_url)
        finally:
            proc.terminate()
            proc.wait(timeout=60)
    clients = 3 + (not args.no_async)
    asked = clients * (args.rounds + args.warmup) * len(bodies) * args.n * args.max_tokens
    result["vllm"] = {
        "requests_per_round": len(bodies),
        **vllm,
        "server_generation_tokens": None if before is None else after - before,
        "tokens_asked": asked,
        "server_tokens_per_s_whole_run": None if before is None else round((after - before) / seconds, 1),
    }
    result["load_average_at_end"] = [round(x, 2) for x in os.getloadavg()]
    result["ratio_new_over_old"] = vllm["ratio_new_over_old"]
    result["ratio_new_over_old_best_round"] = vllm["ratio_new_over_old_best_round"]
    print(json.dumps(result, indent=2))
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=2) + "\n")


if __name__ == "__main__":
    main()
