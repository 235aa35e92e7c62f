"""The `engine` and `sample` config sections: the vLLM engine that sampling, grounding, the export
gate and eval share, and how traces are sampled (offline or from a server), with the checks of
their own values."""

from __future__ import annotations

from dataclasses import dataclass, field

from distill.core.schema import ConfigError, check_choices, check_non_negative, check_positive

ENGINE_PROCESSES = ("auto", "inline", "separate")
SAMPLE_BACKENDS = ("offline", "server")
# Keys of the sample section a resumed run may change without invalidating finished work.
RESUMABLE = (
    "shard_index",
    # a server that moved, or a new key, still serves the same model:
    "server.base_url",
    "server.api_key_env",
    "server.timeout_s",
    "server.retries",
    "server.backoff_s",
    "server.concurrency",
)


@dataclass
class EngineConfig:
    """vLLM offline engine settings shared by sampling, the export gate and eval."""

    max_model_len: int = 1024
    # On CPU vLLM must be given a KV-cache budget, or it reserves a share of RAM (ENVIRONMENT.md).
    kv_cache_memory_bytes: int = 256 * 1024 * 1024
    # "auto": the model's dtype as vLLM picks it (bf16 for a float32 model), but float32 on a CPU
    # without native bf16, where emulated bf16 is several times slower (rollout/engine.py).
    dtype: str = "auto"
    enforce_eager: bool = True
    gpu_memory_utilization: float = 0.85
    # Off by default: with it, vLLM's CPU sampler crashes on per-request seeds (ENVIRONMENT.md;
    # docs/known-traps.md); on GPU it may be turned on for long prompts.
    enable_chunked_prefill: bool = False
    # Eval asks many questions of one prompt and audio (budgets, samples); the ground stage scores
    # an item's traces against one counterfactual prompt (grounding/scoring.py): the shared prefix
    # is computed once. Off only to measure what it saves.
    enable_prefix_caching: bool = True
    # Tokens per KV-cache block, the unit the prefix cache shares: a prompt shorter than a block
    # shares nothing. None: vLLM's default, 16 on GPU but 128 on CPU, longer than the demo's
    # prompts (about 120 tokens); the demo config sets 32 (vLLM's CPU attention wants multiples of 32).
    block_size: int | None = None
    # Prompt tokens the engine prefills per step; vLLM also sizes its encoder cache (the audio
    # embeddings it keeps for requests that reuse a clip) to this many embeddings. None: vLLM's
    # default (4096 on CPU, 8192-16384 on GPU). The ground stage hears each clip again right after
    # sampling (probes, the real-audio pass, another item's swap), so a cache that holds the
    # round's clips saves encoding them twice (docs/benchmarks.md, "Grounding"). Without chunked
    # prefill it must hold the longest prompt: at least max_model_len.
    max_num_batched_tokens: int | None = None
    # Where vLLM's engine runs: "inline" (in this process), "separate" (vLLM's default: an engine
    # process and a worker process, which overlap scheduling with the forward pass), or "auto":
    # inline on CPU, where the two processes took 25 s of a 29 s engine start and sampled no faster,
    # separate on GPU.
    process: str = "auto"


@dataclass
class ServerConfig:
    """An OpenAI-compatible server to sample from (sample.backend=server): a model that needs its
    own vLLM build (the Step-Audio family is served this way) or a shared inference cluster."""

    base_url: str = "http://127.0.0.1:8000/v1"
    # Served model name ("": the first model the server lists).
    model: str = ""
    # Environment variable holding the server's API key (never stored in configs or logs).
    api_key_env: str = "DISTILL_SERVER_API_KEY"
    # Per request. A timeout, connection error or 5xx/429 answer is retried `retries` times, waiting
    # backoff_s, 2 backoff_s, 4 backoff_s, ... between attempts (distill's retries; the OpenAI SDK's are off).
    timeout_s: float = 600.0
    retries: int = 3
    backoff_s: float = 2.0
    # Requests in flight (one per item, each asking for sample.n traces).
    concurrency: int = 16
    # Audio goes as base64 WAV parts of at most this many seconds.
    chunk_seconds: float = 25.0
    # Extra stop tokens (ids of the served model's vocabulary), e.g. a turn-end token.
    stop_token_ids: list[int] = field(default_factory=list)


@dataclass
class SampleConfig:
    # "offline": vLLM in this process on the round's model; "server": sample.server.
    backend: str = "offline"
    server: ServerConfig = field(default_factory=ServerConfig)
    n: int = 8
    temperature: float = 1.0
    top_p: float = 1.0
    max_tokens: int = 128
    # Appended to the rendered chat prompt so every trace starts inside a reasoning block.
    generation_prefix: str = "<think>\n"
    num_shards: int = 1
    # -1: all shards in this process; otherwise one shard (or SLURM_ARRAY_TASK_ID when set).
    shard_index: int = -1
    # Never generate the model's audio-input tokens (its family's placeholders): a trace holding one is
    # unusable (training and teacher-forced scoring would read it as a slot for audio).
    ban_audio_tokens: bool = True
    # Do not sample again the items every sample of the previous round answered right (its
    # set_aside.json): their traces would teach nothing, their budget goes to the rest.
    skip_solved: bool = False


def validate_engine(engine: EngineConfig) -> None:
    """Raise ConfigError for the first bad value of the `engine` section."""
    check_choices("engine", engine, {"process": ENGINE_PROCESSES})
    check_positive("engine", engine, ("max_model_len", "kv_cache_memory_bytes"))
    budget = engine.max_num_batched_tokens
    if budget is not None and budget < (1 if engine.enable_chunked_prefill else engine.max_model_len):
        raise ConfigError(
            f"engine.max_num_batched_tokens={budget}: must be positive, and without chunked prefill at "
            f"least engine.max_model_len={engine.max_model_len} (a prompt is prefilled in one step)"
        )
    if engine.block_size is not None and engine.block_size < 1:
        raise ConfigError(
            f"engine.block_size={engine.block_size}: must be positive (or null: vLLM's default)"
        )
    if not 0.0 < engine.gpu_memory_utilization <= 1.0:
        raise ConfigError(f"engine.gpu_memory_utilization={engine.gpu_memory_utilization}: must be in (0, 1]")


def validate_sample(sample: SampleConfig) -> None:
    """Raise ConfigError for the first bad value of the `sample` section."""
    check_choices("sample", sample, {"backend": SAMPLE_BACKENDS})
    check_positive("sample", sample, ("n", "max_tokens", "num_shards"))
    check_positive("sample.server", sample.server, ("timeout_s", "concurrency", "chunk_seconds"))
    check_non_negative("sample.server", sample.server, ("retries", "backoff_s"))
    if not 0.0 < sample.top_p <= 1.0:
        raise ConfigError(f"sample.top_p={sample.top_p!r}: must be in (0, 1]")
    if sample.temperature < 0:
        raise ConfigError(f"sample.temperature={sample.temperature!r}: must be >= 0")
    if not -1 <= sample.shard_index < sample.num_shards:
        raise ConfigError(
            f"sample.shard_index={sample.shard_index}: must be -1 or in [0, {sample.num_shards})"
        )
