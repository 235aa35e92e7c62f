"""The one configuration schema of distill (OmegaConf structured dataclasses).

A run is configured by a YAML preset (configs/*.yaml) plus `key=value` overrides. Unknown keys
and values of the wrong type fail in `load_config`, before any work starts, naming the key.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from types import SimpleNamespace
from typing import Any

from omegaconf import MISSING, DictConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException


class ConfigError(ValueError):
    """A configuration key or value is wrong; the message names the key."""


@dataclass
class TinyModelConfig:
    """The tiny random model the loop builds when model.build_tiny is set (`distill
    make-tiny-model` builds the defaults): its family (distill/models) and sizes."""

    family: str = "qwen2_audio"

    audio_d_model: int = 64
    audio_layers: int = 2
    audio_heads: int = 2
    text_hidden: int = 128
    text_layers: int = 2
    # vLLM's CPU attention takes head sizes 32, 64, 80, ... only.
    text_heads: int = 2
    text_kv_heads: int = 1
    text_intermediate: int = 256
    vocab_size: int = 512
    seed: int = 0


@dataclass
class ModelConfig:
    # Directory of a Hugging Face model of a supported family (distill/models).
    path: str = MISSING
    # Build a tiny random model at `path` when nothing is there yet (demo and tests).
    build_tiny: bool = False
    tiny: TinyModelConfig = field(default_factory=TinyModelConfig)


@dataclass
class SyntheticDataConfig:
    families: list[str] = field(default_factory=lambda: ["pitch_level"])
    difficulty: int = 1
    # Difficulty of the cold start's items (0: same as `difficulty`): a curriculum that starts
    # easy and leaves the harder question pool to the rounds.
    cold_start_difficulty: int = 0
    train_items: int = 64
    eval_items: int = 64
    # "choice" (options listed), "free" (open answer) or "mixed" (alternating).
    answer_format: str = "choice"
    seed: int = 0


@dataclass
class SourceConfig:
    """One item source: a distill JSONL manifest, an MMAU-style JSON list, a `datasets`
    save_to_disk folder or a parquet file (data_pipelines/readers.py)."""

    path: str = MISSING
    format: str = "auto"
    # Share of the mix (data.train_mix), relative to the other sources' weights.
    weight: float = 1.0
    # Item field -> column name, for columns the readers' aliases do not know.
    fields: dict[str, str] = field(default_factory=dict)
    # Folder that relative audio paths start from (default: the source's folder).
    audio_root: str = ""


@dataclass
class AudioConfig:
    """What the model accepts as audio; every item is checked against it before any sampling."""

    # Step-Audio serves at most 29.98 s per audio item; the Whisper-style encoders read 30 s
    # (each family's limit: distill/models).
    max_seconds: float = 30.0
    # Longer audio: "reject" it, "truncate" it to max_seconds, or "chunk" it into pieces of
    # chunk_seconds (at most max_chunks), each a separate audio input, as the Step-Audio client does.
    long_audio: str = "reject"
    chunk_seconds: float = 25.0
    max_chunks: int = 4
    min_sample_rate: int = 8000
    # Peak amplitude at or below this counts as silence only (about -80 dBFS).
    silence_peak: float = 1e-4
    # Prepared waveforms by content hash, shared by all stages and processes ("": <run dir>/cache/audio).
    cache_dir: str = ""
    # Threads that decode audio during validation.
    workers: int = 2


@dataclass
class DataConfig:
    # Item sources (any format of data_pipelines/readers.py); empty means: generate synthetic items.
    train_manifest: str = ""
    eval_manifest: str = ""
    # Items whose reference traces the cold start trains on (default: the train items).
    cold_start_manifest: str = ""
    # Several train sources mixed by weight (instead of train_manifest).
    train_mix: list[SourceConfig] = field(default_factory=list)
    # Size of the train mix (0: the largest the sources allow at their weights, without repeats).
    mix_items: int = 0
    # Fail on the first bad item instead of setting bad items aside in data/rejects/.
    strict: bool = False
    synthetic: SyntheticDataConfig = field(default_factory=SyntheticDataConfig)
    audio: AudioConfig = field(default_factory=AudioConfig)
    sample_rate: int = 16000
    system_prompt: str = "You are a helpful assistant that listens carefully and reasons about sounds."


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


# Rule checks of the filter stage (distill/rewards/checks.py), in the order they run.
RULE_CHECKS = ("finished", "control_tokens", "format", "length", "language", "degeneration", "self_cognition",
               "correct", "agreement", "acoustic_terms")
# Checks the filter adds from the grounding stage's measurements (distill/grounding).
GROUNDING_CHECKS = ("text_solvable", "audio_dependence")
KEEP_POLICIES = ("first", "shortest", "diverse")
ATTN_IMPLEMENTATIONS = ("auto", "sdpa", "eager", "flash_attention_2", "flash_attention_3")


@dataclass
class JudgeConfig:
    """An optional LLM judge: an OpenAI-compatible endpoint (e.g. `vllm serve` of a judge model)
    scores each trace that passed the rule checks, with the audio attached."""

    enabled: bool = False
    base_url: str = "http://127.0.0.1:8000/v1"
    # Served model name ("": the first model the server lists).
    model: str = ""
    rubric: str = (
        "You grade a step-by-step answer to a question about an audio clip. Give a high score only if the "
        "reasoning is grounded in acoustic features actually heard (pitch, loudness, duration, rhythm, timbre, "
        "noise, timing) rather than an imagined transcript, is logically coherent, and supports the final "
        "answer. Reply with one line: 'Score: N' with N from 0 to 10."
    )
    min_score: float = 6.0
    # vLLM servers only: constrain the reply to this regex (structured outputs), e.g. "Score: (10|[0-9])".
    score_regex: str = ""
    timeout_s: float = 60.0
    retries: int = 2
    backoff_s: float = 1.0
    concurrency: int = 8
    max_tokens: int = 64
    # A trace whose judge call failed (timeout, HTTP error) or whose reply holds no score: "reject" or "keep".
    on_error: str = "reject"
    send_audio: bool = True
    # Environment variable holding the endpoint's API key (never stored in configs or logs).
    api_key_env: str = "DISTILL_JUDGE_API_KEY"


@dataclass
class LexicalConfig:
    """The cheap lexical grounding signal: does the reasoning cite acoustic properties? Terms are
    lower-case substrings matched in the lower-cased reasoning (a leading space anchors a short
    one at a word start: " db", " rms"), listed per language; every language's terms apply."""

    acoustic_terms: dict[str, list[str]] = field(default_factory=lambda: {
        "en": ["hz", "pitch", "frequenc", "tone", "tonal", "loud", "quiet", "decibel", " db", "volume", "amplitude",
               "duration", "lasts", "seconds", " ms", "millisecond", "rhythm", "tempo", "beat", "bpm", "timbre",
               "noise", "noisy", "onset", "harmonic", "spectr", "energy", " rms", "envelope", "silen", "echo",
               "reverb", "timing", "interval", "pulse", "click", "resonan", "formant", "vibrato", "bass",
               "treble", "fundamental", "overtone", "waveform", "sustain", "decay"],
        "zh": ["音高", "频率", "赫兹", "响度", "音量", "分贝", "时长", "节奏", "节拍", "速度", "音色", "噪声", "噪音",
               "谐波", "频谱", "能量", "静音", "回声", "混响", "音调", "基频", "秒"],
    })
    # Transcript-only language; named in the reason of a trace that cites no acoustic term.
    transcript_terms: dict[str, list[str]] = field(default_factory=lambda: {
        "en": ["says", "said", "saying", "the words", "the word ", "transcript", "the text", "sentence",
               "mention", "lyrics", "the speaker states"],
        "zh": ["说", "文字", "转写", "文本", "句子", "提到", "歌词"],
    })
    # Distinct acoustic terms a reasoning must cite to pass the "acoustic_terms" check.
    min_acoustic_terms: int = 1


@dataclass
class FilterConfig:
    # Rule checks that must pass for a trace to be kept (all by default).
    checks: list[str] = field(default_factory=lambda: list(RULE_CHECKS))
    # Keep at most this many passing traces per prompt, chosen by keep_policy: "first" (sample
    # order), "shortest" reasoning, or "diverse" (near-duplicates removed, then the most different).
    keep_per_prompt: int = 4
    keep_policy: str = "first"
    # Word 3-gram Jaccard similarity at or above which two traces count as near-duplicates.
    near_duplicate: float = 0.8
    # Keep prompts whose share of correct samples lies in [min, max] (the report keeps 3-6 of 8 for RL).
    pass_rate_min: float = 0.0
    pass_rate_max: float = 1.0
    min_reasoning_chars: int = 1
    min_reasoning_tokens: int = 1
    # 0: no cap (truncated generations are rejected by the "finished" check anyway).
    max_reasoning_tokens: int = 0
    # Scripts a trace may use besides the question's own ("auto": only the question's; see
    # distill/rewards/checks.py SCRIPTS): e.g. [latin] rejects stray Chinese in English traces.
    allowed_scripts: list[str] = field(default_factory=lambda: ["auto"])
    # Degeneration: a block of at most repeat_max_period characters repeated max_repeats times back
    # to back is a loop (found from a probe window of repeat_window characters).
    repeat_window: int = 40
    max_repeats: int = 4
    repeat_max_period: int = 400
    # The answer: inside <answer_tag>...</answer_tag> when set, else the first line after </think>.
    answer_tag: str = ""
    # Numeric answers match when |got - ref| <= abs_tol + rel_tol * |ref| (units converted: ms/s, Hz/kHz).
    number_rel_tol: float = 0.0
    number_abs_tol: float = 0.0
    # A custom answer verifier "package.module:function" called as f(answer, reference, trace) -> bool.
    verifier: str = ""
    # Reward per trace: the sum of these weights over the checks it passed (stored for RL).
    reward_weights: dict[str, float] = field(default_factory=lambda: {"correct": 0.8, "format": 0.2})
    lexical: LexicalConfig = field(default_factory=LexicalConfig)
    judge: JudgeConfig = field(default_factory=JudgeConfig)


@dataclass
class GroundingConfig:
    """Acoustic grounding (distill/grounding), measured between sampling and filtering with the
    sampling engine: counterfactual-audio probes per item, audio dependence per trace."""

    enabled: bool = True
    # Counterfactual inputs: "silence", "noise" (white noise at the clip's RMS level) and "swap"
    # (another item's audio, one with a different answer where the split has one).
    counterfactuals: list[str] = field(default_factory=lambda: ["silence", "noise", "swap"])
    # Silence and noise come from a bank shared by all clips: lengths rounded down to this step
    # (0: exact lengths, one new input per clip for the engine to prepare) and whole-dB levels.
    bank_seconds: float = 0.25
    # Text-solvable probe: answers sampled per item with the real audio and with each counterfactual.
    probe_samples: int = 2
    # Which items are probed: "keepable" (those with a trace the filter's selection can keep; a flag
    # on any other item changes nothing that is kept, so the round's probe metrics are over the items
    # it trains on) or "all" (every item, for a census of the split).
    probe_items: str = "keepable"
    # The probe answers directly after an empty think block (cheap); "<think>\n" with
    # probe_max_tokens = sample.max_tokens and probe_answers = free probes with full reasoning instead.
    probe_prefix: str = "<think>\n\n</think>\n"
    # "options": an item with a closed answer set (its choices; yes and no for a yes/no answer)
    # answers with one of them (vLLM structured outputs): which option the model prefers, also
    # for a model not yet trained to answer directly, in a token or two. "free": every item
    # samples free text of up to probe_max_tokens (open answers always do).
    probe_answers: str = "options"
    probe_max_tokens: int = 16
    probe_temperature: float = 1.0
    # An item is answerable from text when its counterfactual answers are right at chance + margin or more.
    text_solvable_margin: float = 0.3
    # The traces of text-solvable items: "drop" them, "downweight" them in training, or "keep" them (flag only).
    text_solvable: str = "downweight"
    text_solvable_weight: float = 0.25
    # Audio dependence: teacher-forced log-probability of each trace with the real audio minus with
    # each of these counterfactuals (vLLM prompt_logprobs); the smallest gain counts. Each kind
    # costs one more forward pass per trace. "swap" asks the sharpest question (is the trace
    # less likely under a clip with another answer?) and reuses audio the engine already prepared.
    score_against: list[str] = field(default_factory=lambda: ["swap"])
    # Which traces are scored: "keepable" (only as many traces that passed every rule check as the
    # filter's per-prompt selection can keep: passing traces of prompts outside the pass-rate band
    # or over keep_per_prompt are not scored, unless a dependence rejection opens a place; with the
    # LLM judge, which may reject scored traces after grounding, every passing trace is scored),
    # "passing" (every trace that passed the rule checks) or "all".
    score_traces: str = "keepable"
    # The real audio's log-probability of a trace: "sampled" (returned by the engine while it
    # sampled the trace, so only the counterfactuals cost a pass; traces from a server are scored)
    # or "scored" (a teacher-forced pass like the counterfactuals', the same kernels on both sides).
    # Sampling with log-probabilities costs a few percent of sampling; the pass it saves is half
    # the scoring with the default score_against. "scored" is cheaper for short traces of which
    # few are scored (docs/benchmarks.md, "Grounding").
    real_logprobs: str = "sampled"
    # Traces scored per engine call (bounds the memory of the per-token log-probabilities).
    score_batch: int = 256
    # Counterfactual scorings read vLLM's prefix cache, so an item's traces share the prompt they
    # are scored under (grounding/scoring.py; needs engine.enable_prefix_caching and a block no
    # longer than the prompt, engine.block_size). Off only to measure what it saves: the scores
    # are the same.
    reuse_prefix_cache: bool = True
    # The "audio_dependence" filter: reasoning must gain at least this many nats per token from
    # the real audio (null: no threshold; the default sits above bf16 jitter, so a trace that does
    # not depend on the audio at all is rejected) ...
    min_dependence: float | None = 0.001
    # ... and the answer at least this many nats in all (null: no threshold).
    min_answer_dependence: float | None = None


@dataclass
class TrainableConfig:
    """Which parts of the model train. The report keeps the audio encoder frozen throughout."""

    audio_encoder: bool = False
    projector: bool = True
    language_model: bool = True


@dataclass
class LoraConfig:
    """LoRA (peft) on the language model only; merged into full weights when training ends."""

    enabled: bool = False
    r: int = 16
    alpha: int = 32
    dropout: float = 0.05
    # Projection names inside the language model's layers (the audio encoder's are never wrapped).
    target_modules: list[str] = field(default_factory=lambda: [
        "q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"])


@dataclass
class MixSourceConfig:
    """Extra SFT data mixed with the round's kept traces.

    kind "text_cot": JSONL rows {"id"?, "question", "reasoning", "answer"} (text-only chain of
    thought); kind "direct_audio": items in any data_pipelines reader format, trained as
    `<think>\n\n</think>\n{answer}`. `weight` is rows of this source per kept-trace row.
    """

    kind: str = MISSING
    path: str = MISSING
    weight: float = 0.1


@dataclass
class TrainConfig:
    learning_rate: float = 5e-4
    weight_decay: float = 0.0
    warmup_steps: int = 5
    epochs: float = 1.0
    # Hard cap on optimizer steps (0: no cap).
    max_steps: int = 0
    # Samples per micro batch (per rank); packing lays them in rows of up to max_seq_len tokens.
    micro_batch_size: int = 8
    grad_accum: int = 1
    # Longest training sequence (and packed row) in tokens.
    max_seq_len: int = 1024
    # Pack several samples into each row (attention and positions kept per sample), so no compute
    # goes to padding. Off: one sample per row, padded; group_by_length keeps the padding small.
    # null (auto): on with flash-attention (varlen: no cost across samples), off otherwise, as a
    # block-diagonal mask computes attention over the whole packed row (measured slower on CPU).
    packing: bool | None = None
    group_by_length: bool = True
    # "auto": flash_attention_2 on GPU when flash-attn is installed, else sdpa.
    attn_implementation: str = "auto"
    # Loss weight of the tokens after </think> relative to the reasoning tokens.
    answer_loss_weight: float = 1.0
    max_grad_norm: float = 1.0
    trainable: TrainableConfig = field(default_factory=TrainableConfig)
    lora: LoraConfig = field(default_factory=LoraConfig)
    gradient_checkpointing: bool = False
    # A frozen audio encoder gives the same output for the same clip every time: compute it once
    # per clip (traces of one item share their audio) and keep it up to this many MiB (0: off).
    # Not with ZeRO-3, where every rank must run every module.
    audio_encoder_cache_mb: int = 1024
    zero_stage: int = 2
    # A DeepSpeed JSON config (configs/deepspeed/*.json) instead of the one built from zero_stage.
    deepspeed_config: str = ""
    offload_optimizer: bool = False
    num_processes: int = 2
    # How long a rank waits for its peers, at start and in each collective, before it exits with
    # a message: a rank whose peer died or hangs must not block for ever.
    collective_timeout_s: float = 600.0
    # "cpu" forces CPU training (gloo); "auto" uses CUDA when present.
    device: str = "auto"
    # "auto": bf16 on GPU, full precision on CPU.
    mixed_precision: str = "auto"
    # Save the training state every this many optimizer steps, so an interrupted stage resumes
    # from its last checkpoint (0: never).
    save_steps: int = 50
    # Extra data mixed with the kept traces.
    mix: list[MixSourceConfig] = field(default_factory=list)
    # Where each round's student starts: "continue" from the previous round's model, or "base":
    # the base model retrained on the kept traces of every round so far (ReST-EM).
    init: str = "continue"
    seed: int = 0


@dataclass
class ColdStartConfig:
    enabled: bool = True
    # How many train items' reference traces the cold start sees (0: all). Reference reasoning is
    # scarce in practice; the rounds then write traces for the whole question pool.
    items: int = 0
    train: TrainConfig = field(default_factory=TrainConfig)


@dataclass
class ExportConfig:
    """The export gate: the exported model must load in vLLM, generate, and agree with transformers."""

    # Held-out items the exported model answers greedily in vLLM.
    probes: int = 4
    # vLLM (which serves a float32 checkpoint in bf16) and transformers in float32 must give the
    # probe answers' tokens the same log-probabilities, to this mean absolute difference in nats
    # per token; a mis-mapped weight or config shows as differences of whole nats.
    max_logprob_diff: float = 0.05


@dataclass
class HubConfig:
    """Push every finished round to the HF Hub (distill push does one by hand): the exported
    model to `repo_id`, branch round-NNN; the kept traces to `dataset_repo_id` when set. The
    token is the hub client's (HF_TOKEN or its login cache), never distill's."""

    repo_id: str = ""
    dataset_repo_id: str = ""
    private: bool = True


@dataclass
class BenchmarkConfig:
    """An external benchmark file evaluated every round (e.g. MMAU's test-mini JSON with its audio
    on local disk), read by the data pipelines' readers and validated like any split."""

    name: str = MISSING
    path: str = MISSING
    format: str = "auto"
    # Folder that relative audio paths start from (default: the file's folder).
    audio_root: str = ""
    fields: dict[str, str] = field(default_factory=dict)
    # Items evaluated (0 = all): a quick look at a large benchmark every round.
    max_items: int = 0


@dataclass
class EvalConfig:
    """Per-round evaluation on the held-out split (and any benchmarks), on one vLLM engine."""

    # Greedy generation budget: reasoning and answer together.
    max_tokens: int = 128
    # Samples per item at `temperature` for pass@k and majority-vote accuracy (0: off).
    k: int = 4
    temperature: float = 0.8
    top_p: float = 1.0
    # Thinking budgets of the test-time scaling curve (tokens of reasoning; each at most
    # max_tokens): the greedy reasoning is cut at the budget, `</think>` forced, the answer generated.
    # Empty: 0, a quarter, half and all of max_tokens.
    budgets: list[int] = field(default_factory=list)
    answer_max_tokens: int = 16
    # Text put after reasoning cut at a budget, so the model must answer now.
    force_answer: str = "\n</think>\n"
    # Accuracy at the largest budget this far below the best smaller budget counts as inverted scaling.
    inverted_margin: float = 0.05
    # Grounding gap: greedy accuracy with the real audio minus with each of these.
    counterfactuals: list[str] = field(default_factory=lambda: ["silence", "swap"])
    benchmarks: list[BenchmarkConfig] = field(default_factory=list)

    @property
    def thinking_budgets(self) -> list[int]:
        """`budgets`, or by default 0, a quarter, half and all of `max_tokens`."""
        if self.budgets:
            return list(self.budgets)
        return sorted({0, self.max_tokens // 4, self.max_tokens // 2, self.max_tokens})


@dataclass
class SlurmConfig:
    """`distill slurm submit`: per round a sampling job array (one shard per task), a grounding
    array, a filter job, a multi-node training job and an export+eval job, chained with afterok."""

    partition: str = ""
    account: str = ""
    qos: str = ""
    # GPUs per node for the sampling, grounding, training and eval jobs (0: CPU only).
    gpus_per_node: int = 0
    cpus_per_task: int = 4
    # Memory per node, e.g. "64G" ("": the partition's default).
    mem: str = ""
    # Nodes of the training job; train.num_processes counts the processes of all of them.
    train_nodes: int = 1
    time_sample: str = "04:00:00"
    time_filter: str = "01:00:00"
    time_train: str = "12:00:00"
    time_eval: str = "02:00:00"
    # Shell lines every job runs first (module load ..., source .venv/bin/activate).
    setup: list[str] = field(default_factory=list)
    # Extra sbatch options for every job, e.g. ["--constraint=h100", "--exclusive"].
    extra_args: list[str] = field(default_factory=list)
    # At most this many array tasks at once (0: no limit).
    array_parallel: int = 0
    # Folder with your own stage.sbatch / train.sbatch (default: the ones in launch/templates/).
    template_dir: str = ""
    # The Python the jobs run distill with (default: the one that submits).
    python: str = ""
    # Port of the training job's main process (plus the job id modulo 1000, so jobs do not collide).
    main_process_port: int = 29500


@dataclass
class LoopConfig:
    rounds: int = 2


@dataclass
class WandbConfig:
    mode: str = "offline"
    project: str = "distill"


@dataclass
class Config:
    run_name: str = MISSING
    output_dir: str = "checkpoints"
    seed: int = 0
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    engine: EngineConfig = field(default_factory=EngineConfig)
    sample: SampleConfig = field(default_factory=SampleConfig)
    grounding: GroundingConfig = field(default_factory=GroundingConfig)
    filter: FilterConfig = field(default_factory=FilterConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    cold_start: ColdStartConfig = field(default_factory=ColdStartConfig)
    export: ExportConfig = field(default_factory=ExportConfig)
    hub: HubConfig = field(default_factory=HubConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    loop: LoopConfig = field(default_factory=LoopConfig)
    wandb: WandbConfig = field(default_factory=WandbConfig)
    slurm: SlurmConfig = field(default_factory=SlurmConfig)

    @property
    def run_dir(self) -> Path:
        return Path(self.output_dir) / self.run_name


# Head sizes vLLM 0.32's CPU attention accepts (CPUAttentionBackend.get_supported_head_sizes).
VLLM_CPU_HEAD_SIZES = (32, 64, 80, 96, 112, 128, 160, 192, 224, 256, 512)

# Keys a resumed run may change without invalidating what is already on disk.
RESUMABLE_CHANGES = ("loop.rounds", "wandb.mode", "wandb.project", "sample.shard_index",
                     # how the work is done, not what it produces:
                     "data.audio.workers", "filter.judge.concurrency", "filter.judge.timeout_s",
                     "filter.judge.retries", "filter.judge.backoff_s", "train.save_steps", "cold_start.train.save_steps",
                     "train.audio_encoder_cache_mb", "cold_start.train.audio_encoder_cache_mb",
                     "train.collective_timeout_s", "cold_start.train.collective_timeout_s",
                     # the real audio's log-probabilities, from sampling or a pass (traces sampled
                     # without them are scored by a pass, so a round may mix the two):
                     "grounding.real_logprobs",
                     # the same scores, read through the prefix cache or not:
                     "grounding.reuse_prefix_cache",
                     # a server that moved, or a new key, still serves the same model:
                     "sample.server.base_url", "sample.server.api_key_env", "sample.server.timeout_s",
                     "sample.server.retries", "sample.server.backoff_s", "sample.server.concurrency")
# Whole sections a resume may change: where and how jobs are scheduled.
RESUMABLE_SECTIONS = ("slurm.",)


def resumable(key: str) -> bool:
    """Whether a resumed run may change config key `key` without invalidating finished work."""
    return key in RESUMABLE_CHANGES or key.startswith(RESUMABLE_SECTIONS)

_CHOICES: dict[str, tuple[Any, ...]] = {
    "train.zero_stage": (0, 1, 2, 3),
    "cold_start.train.zero_stage": (0, 1, 2, 3),
    "train.device": ("auto", "cpu", "cuda"),
    "cold_start.train.device": ("auto", "cpu", "cuda"),
    "train.mixed_precision": ("auto", "no", "bf16", "fp16"),
    "train.init": ("continue", "base"),
    "train.attn_implementation": ATTN_IMPLEMENTATIONS,
    "cold_start.train.mixed_precision": ("auto", "no", "bf16", "fp16"),
    "cold_start.train.attn_implementation": ATTN_IMPLEMENTATIONS,
    "wandb.mode": ("offline", "online", "disabled"),
    "data.synthetic.difficulty": (1, 2, 3),
    "data.synthetic.cold_start_difficulty": (0, 1, 2, 3),
    "data.synthetic.answer_format": ("choice", "free", "mixed"),
    "data.audio.long_audio": ("reject", "truncate", "chunk"),
    "filter.keep_policy": KEEP_POLICIES,
    "sample.backend": ("offline", "server"),
    "filter.judge.on_error": ("reject", "keep"),
    "grounding.text_solvable": ("drop", "downweight", "keep"),
    "grounding.score_traces": ("keepable", "passing", "all"),
    "grounding.probe_items": ("keepable", "all"),
    "grounding.real_logprobs": ("sampled", "scored"),
    "grounding.probe_answers": ("options", "free"),
    "engine.process": ("auto", "inline", "separate"),
}
_POSITIVE = (
    "sample.n", "sample.max_tokens", "sample.num_shards", "filter.keep_per_prompt", "train.micro_batch_size",
    "train.grad_accum", "train.num_processes", "loop.rounds", "eval.max_tokens", "engine.max_model_len",
    "cold_start.train.micro_batch_size", "cold_start.train.num_processes", "data.sample_rate",
    "cold_start.train.grad_accum", "train.max_seq_len", "cold_start.train.max_seq_len",
    "train.learning_rate", "cold_start.train.learning_rate", "engine.kv_cache_memory_bytes",
    "train.epochs", "cold_start.train.epochs", "data.synthetic.train_items", "data.synthetic.eval_items",
    "data.audio.max_seconds", "data.audio.chunk_seconds", "data.audio.max_chunks", "data.audio.min_sample_rate",
    "data.audio.workers", "filter.repeat_window", "filter.max_repeats", "filter.repeat_max_period", "filter.judge.timeout_s",
    "filter.judge.concurrency", "filter.judge.max_tokens", "grounding.probe_max_tokens",
    "grounding.score_batch", "sample.server.timeout_s", "sample.server.concurrency", "sample.server.chunk_seconds",
    "export.probes", "export.max_logprob_diff", "eval.answer_max_tokens", "slurm.cpus_per_task",
    "slurm.train_nodes", "slurm.main_process_port", "train.lora.r", "train.lora.alpha", "cold_start.train.lora.r",
    "cold_start.train.lora.alpha", "train.collective_timeout_s", "cold_start.train.collective_timeout_s",
)
_NON_NEGATIVE = (
    "cold_start.items", "train.max_steps", "cold_start.train.max_steps", "train.warmup_steps",
    "cold_start.train.warmup_steps", "train.max_grad_norm", "cold_start.train.max_grad_norm",
    "train.answer_loss_weight", "cold_start.train.answer_loss_weight", "data.mix_items", "data.audio.silence_peak",
    "filter.min_reasoning_tokens", "filter.max_reasoning_tokens", "filter.number_rel_tol", "filter.number_abs_tol",
    "filter.judge.retries", "filter.judge.backoff_s", "grounding.probe_samples", "grounding.probe_temperature",
    "grounding.text_solvable_margin", "grounding.text_solvable_weight", "filter.lexical.min_acoustic_terms",
    "grounding.bank_seconds", "sample.server.retries", "sample.server.backoff_s", "train.save_steps", "cold_start.train.save_steps", "train.audio_encoder_cache_mb",
    "cold_start.train.audio_encoder_cache_mb", "eval.k", "eval.temperature", "eval.inverted_margin",
    "slurm.gpus_per_node", "slurm.array_parallel",
)


def _get(cfg: object, dotted: str) -> Any:
    for part in dotted.split("."):
        cfg = getattr(cfg, part)
    return cfg


def _check_ranges(root: object, prefix: str = "") -> None:
    """The choice and sign checks of every key that starts with `prefix` ("" for all)."""
    def value(key: str) -> Any:
        return _get(root, key)

    for key, allowed in _CHOICES.items():
        if key.startswith(prefix) and value(key) not in allowed:
            raise ConfigError(f"{key}={value(key)!r}: must be one of {', '.join(map(repr, allowed))}")
    for key in _POSITIVE:
        if key.startswith(prefix) and value(key) <= 0:
            raise ConfigError(f"{key}={value(key)!r}: must be positive")
    for key in _NON_NEGATIVE:
        if key.startswith(prefix) and value(key) < 0:
            raise ConfigError(f"{key}={value(key)!r}: must be >= 0")


MIX_KINDS = ("text_cot", "direct_audio")


def _validate_train(section: str, tcfg: TrainConfig) -> None:
    parts = tcfg.trainable
    if not (parts.audio_encoder or parts.projector or parts.language_model or tcfg.lora.enabled):
        raise ConfigError(f"{section}.trainable: nothing trains; make a part trainable or enable {section}.lora")
    if tcfg.lora.enabled and parts.audio_encoder:
        raise ConfigError(f"{section}.lora.enabled with {section}.trainable.audio_encoder=true: LoRA adapts the "
                          "language model only; train the encoder fully without LoRA, or keep it frozen")
    if tcfg.lora.enabled and not parts.language_model:
        raise ConfigError(f"{section}.lora.enabled with {section}.trainable.language_model=false: the adapters are "
                          "the language model's training; enable one without the other")
    if tcfg.zero_stage == 0 and (tcfg.offload_optimizer or tcfg.deepspeed_config):
        raise ConfigError(f"{section}.offload_optimizer / deepspeed_config need DeepSpeed: set {section}.zero_stage")
    if tcfg.attn_implementation.startswith("flash_attention") and tcfg.device == "cpu":
        raise ConfigError(f"{section}.attn_implementation={tcfg.attn_implementation}: flash-attention runs on GPU only")
    if not 0 <= tcfg.lora.dropout < 1:
        raise ConfigError(f"{section}.lora.dropout={tcfg.lora.dropout}: must be in [0, 1)")
    if tcfg.deepspeed_config and not Path(tcfg.deepspeed_config).is_file():
        raise ConfigError(f"{section}.deepspeed_config={tcfg.deepspeed_config}: no such file")
    for i, src in enumerate(tcfg.mix):
        if src.kind not in MIX_KINDS:
            raise ConfigError(f"{section}.mix[{i}].kind={src.kind!r}: must be one of {', '.join(MIX_KINDS)}")
        if not src.weight > 0:
            raise ConfigError(f"{section}.mix[{i}].weight={src.weight}: must be positive")
        if not Path(src.path).exists():
            raise ConfigError(f"{section}.mix[{i}].path={src.path}: no such file")


def _validate(cfg: Config) -> None:
    _check_ranges(cfg)
    if not 0.0 < cfg.sample.top_p <= 1.0:
        raise ConfigError(f"sample.top_p={cfg.sample.top_p!r}: must be in (0, 1]")
    if cfg.sample.temperature < 0:
        raise ConfigError(f"sample.temperature={cfg.sample.temperature!r}: must be >= 0")
    if not -1 <= cfg.sample.shard_index < cfg.sample.num_shards:
        raise ConfigError(
            f"sample.shard_index={cfg.sample.shard_index}: must be -1 or in [0, {cfg.sample.num_shards})"
        )
    if cfg.sample.backend == "server" and cfg.grounding.enabled:
        raise ConfigError("sample.backend=server with grounding.enabled: grounding scores traces with the round's "
                          "model in an offline vLLM engine, which a served-only model does not have; set "
                          "grounding.enabled=false")
    if cfg.cold_start.train.init != "continue":
        raise ConfigError("cold_start.train.init: the cold start trains the base model; train.init picks the rounds'")
    for section in ("train", "cold_start.train"):
        tcfg = _get(cfg, section)
        if tcfg.zero_stage == 0 and tcfg.num_processes > 1:
            raise ConfigError(f"{section}.zero_stage=0 with {section}.num_processes={tcfg.num_processes}: "
                              "multi-process training runs through DeepSpeed; use zero_stage 1, 2 or 3")
        _validate_train(section, tcfg)
        if tcfg.max_seq_len < cfg.engine.max_model_len:
            # A sampled trace fills up to max_model_len; a shorter training window would cut it.
            raise ConfigError(f"{section}.max_seq_len={tcfg.max_seq_len}: must be >= engine.max_model_len="
                              f"{cfg.engine.max_model_len}")
    budget = cfg.engine.max_num_batched_tokens
    if budget is not None and budget < (1 if cfg.engine.enable_chunked_prefill else cfg.engine.max_model_len):
        raise ConfigError(f"engine.max_num_batched_tokens={budget}: must be positive, and without chunked prefill at "
                          f"least engine.max_model_len={cfg.engine.max_model_len} (a prompt is prefilled in one step)")
    if cfg.engine.block_size is not None and cfg.engine.block_size < 1:
        raise ConfigError(f"engine.block_size={cfg.engine.block_size}: must be positive (or null: vLLM's default)")
    if not 0.0 < cfg.engine.gpu_memory_utilization <= 1.0:
        raise ConfigError(f"engine.gpu_memory_utilization={cfg.engine.gpu_memory_utilization}: must be in (0, 1]")
    for key in ("sample.max_tokens", "eval.max_tokens"):
        if _get(cfg, key) >= cfg.engine.max_model_len:
            raise ConfigError(f"{key}={_get(cfg, key)}: must be below engine.max_model_len="
                              f"{cfg.engine.max_model_len}, which also holds the prompt and audio tokens")
    tiny = cfg.model.tiny
    if cfg.model.build_tiny and tiny.text_heads % tiny.text_kv_heads:
        raise ConfigError(f"model.tiny.text_heads={tiny.text_heads}: must be a multiple of "
                          f"model.tiny.text_kv_heads={tiny.text_kv_heads}")
    if cfg.model.build_tiny and (tiny.text_hidden % tiny.text_heads or tiny.text_hidden // tiny.text_heads
                                 not in VLLM_CPU_HEAD_SIZES):
        raise ConfigError(f"model.tiny.text_hidden/text_heads={tiny.text_hidden}/{tiny.text_heads}: the head size "
                          f"must be one of {VLLM_CPU_HEAD_SIZES} (vLLM's CPU attention)")
    _validate_data(cfg.data)
    _validate_filter(cfg.filter)
    if cfg.sample.skip_solved and "correct" not in cfg.filter.checks:
        raise ConfigError("sample.skip_solved: needs the 'correct' check in filter.checks (it decides what is solved)")
    _validate_grounding(cfg)
    _validate_eval(cfg)
    _validate_slurm(cfg)


def _validate_slurm(cfg: Config) -> None:
    import re

    sl = cfg.slurm
    for key in ("time_sample", "time_filter", "time_train", "time_eval"):
        value = getattr(sl, key)
        if not re.fullmatch(r"(\d+-)?\d+(:\d{2}){0,2}", value):
            raise ConfigError(f"slurm.{key}={value!r}: not a Slurm time limit (minutes, H:MM:SS or D-HH:MM:SS)")
    for section in ("train", "cold_start.train"):
        processes = _get(cfg, section).num_processes
        if processes % sl.train_nodes:
            raise ConfigError(f"{section}.num_processes={processes}: must be a multiple of "
                              f"slurm.train_nodes={sl.train_nodes} (the same number of processes on every node)")
    bad = [a for a in sl.extra_args if not a.startswith("-")]
    if bad:
        raise ConfigError(f"slurm.extra_args: {bad[0]!r} is not an sbatch option (e.g. --constraint=h100)")
    if sl.template_dir and not Path(sl.template_dir).is_dir():
        raise ConfigError(f"slurm.template_dir={sl.template_dir}: no such folder")


def _validate_eval(cfg: Config) -> None:
    from data_pipelines.readers import FORMATS
    from distill.grounding.counterfactual import KINDS

    e = cfg.eval
    if not 0.0 < e.top_p <= 1.0:
        raise ConfigError(f"eval.top_p={e.top_p!r}: must be in (0, 1]")
    if e.k > 1 and e.temperature == 0:
        raise ConfigError(f"eval.temperature=0 with eval.k={e.k}: greedy decoding gives one answer; raise the "
                          "temperature or set eval.k=1")
    if any(b < 0 for b in e.budgets) or sorted(set(e.budgets)) != list(e.budgets):
        raise ConfigError(f"eval.budgets={list(e.budgets)}: must be distinct non-negative token counts in "
                          "increasing order")
    if e.budgets and e.budgets[-1] > e.max_tokens:
        raise ConfigError(f"eval.budgets: {e.budgets[-1]} is above eval.max_tokens={e.max_tokens}, the longest "
                          "reasoning eval generates; raise eval.max_tokens or lower the budget")
    if "</think>" not in e.force_answer:
        raise ConfigError(f"eval.force_answer={e.force_answer!r}: must close the reasoning (contain </think>)")
    unknown = [k for k in e.counterfactuals if k not in KINDS]
    if unknown:
        raise ConfigError(f"eval.counterfactuals: unknown counterfactual(s) {', '.join(unknown)} "
                          f"(known: {', '.join(KINDS)})")
    if e.max_tokens + e.answer_max_tokens >= cfg.engine.max_model_len:
        raise ConfigError(f"eval.max_tokens + eval.answer_max_tokens = {e.max_tokens + e.answer_max_tokens}: must "
                          f"be below engine.max_model_len={cfg.engine.max_model_len} (a budget-cut trace is "
                          "answered after its reasoning)")
    names = [b.name for b in e.benchmarks]
    for i, bench in enumerate(e.benchmarks):
        where = f"eval.benchmarks[{i}]"
        if not bench.name or not all(c.isalnum() or c in "-_." for c in bench.name) or names.count(bench.name) > 1:
            raise ConfigError(f"{where}.name={bench.name!r}: must be a unique name of letters, digits, '-', '_', '.'")
        if bench.format not in FORMATS:
            raise ConfigError(f"{where}.format={bench.format!r}: must be one of {', '.join(FORMATS)}")
        if not Path(bench.path).exists():
            raise ConfigError(f"{where}.path={bench.path}: no such file")
        if bench.max_items < 0:
            raise ConfigError(f"{where}.max_items={bench.max_items}: must be >= 0")


def _validate_filter(f: FilterConfig) -> None:
    from distill.rewards.checks import SCRIPTS

    for key in ("acoustic_terms", "transcript_terms"):
        for lang, terms in getattr(f.lexical, key).items():
            if any(not t.strip() for t in terms):
                raise ConfigError(f"filter.lexical.{key}.{lang}: an empty term would match every trace")
    distinct = len({t.lower() for terms in f.lexical.acoustic_terms.values() for t in terms})
    if "acoustic_terms" in f.checks and f.lexical.min_acoustic_terms > distinct:
        raise ConfigError(f"filter.lexical.min_acoustic_terms={f.lexical.min_acoustic_terms}: more than the "
                          f"{distinct} distinct terms of filter.lexical.acoustic_terms")
    unknown = [c for c in f.checks if c not in RULE_CHECKS]
    if unknown:
        raise ConfigError(f"filter.checks: unknown check(s) {', '.join(unknown)} (known: {', '.join(RULE_CHECKS)})")
    bad = [k for k in f.reward_weights if k not in (*RULE_CHECKS, *GROUNDING_CHECKS, "judge")]
    if bad:
        raise ConfigError(f"filter.reward_weights: unknown check(s) {', '.join(bad)}")
    if not 0.0 <= f.pass_rate_min <= f.pass_rate_max <= 1.0:
        raise ConfigError(f"filter.pass_rate_min={f.pass_rate_min}, filter.pass_rate_max={f.pass_rate_max}: "
                          "need 0 <= min <= max <= 1")
    if not 0.0 < f.near_duplicate <= 1.0:
        raise ConfigError(f"filter.near_duplicate={f.near_duplicate}: must be in (0, 1]")
    scripts = [s for s in f.allowed_scripts if s != "auto" and s not in SCRIPTS]
    if scripts or not f.allowed_scripts:
        raise ConfigError(f"filter.allowed_scripts={f.allowed_scripts}: use 'auto' and/or {', '.join(SCRIPTS)}")
    if f.max_reasoning_tokens and f.max_reasoning_tokens < f.min_reasoning_tokens:
        raise ConfigError(f"filter.max_reasoning_tokens={f.max_reasoning_tokens}: below filter.min_reasoning_tokens")
    if f.max_repeats < 2:
        raise ConfigError(f"filter.max_repeats={f.max_repeats}: must be at least 2 (a block seen twice in a row)")
    if f.repeat_window > f.repeat_max_period:
        raise ConfigError(f"filter.repeat_window={f.repeat_window}: must be at most filter.repeat_max_period="
                          f"{f.repeat_max_period}")
    negative = [k for k, w in f.reward_weights.items() if w < 0]
    if negative:
        raise ConfigError(f"filter.reward_weights: negative weight(s) for {', '.join(negative)}")
    if "correct" not in f.checks and (f.pass_rate_min > 0 or f.pass_rate_max < 1):
        raise ConfigError("filter.pass_rate_min/max: a pass-rate band needs the 'correct' check in filter.checks")
    if f.verifier and ":" not in f.verifier:
        raise ConfigError(f"filter.verifier={f.verifier!r}: expected 'package.module:function'")


def _validate_grounding(cfg: Config) -> None:
    from distill.grounding.counterfactual import KINDS
    from distill.prompting import THINK_CLOSE, THINK_OPEN

    g = cfg.grounding
    for key in ("counterfactuals", "score_against"):
        unknown = [k for k in getattr(g, key) if k not in KINDS]
        if unknown:
            raise ConfigError(f"grounding.{key}: unknown counterfactual(s) {', '.join(unknown)} "
                              f"(known: {', '.join(KINDS)})")
    if not g.enabled:
        return
    if g.probe_samples and not g.counterfactuals:
        raise ConfigError("grounding.probe_samples: probing needs at least one kind in grounding.counterfactuals "
                          "(or set grounding.probe_samples=0)")
    if g.probe_samples > 1 and g.probe_temperature == 0:
        raise ConfigError(f"grounding.probe_temperature=0 with grounding.probe_samples={g.probe_samples}: greedy "
                          "decoding gives one answer; raise the temperature or set probe_samples=1")
    if g.text_solvable_weight > 1:
        raise ConfigError(f"grounding.text_solvable_weight={g.text_solvable_weight}: must be in [0, 1]")
    if g.probe_answers == "options" and g.probe_prefix.count(THINK_OPEN) > g.probe_prefix.count(THINK_CLOSE):
        raise ConfigError(f"grounding.probe_answers=options with grounding.probe_prefix={g.probe_prefix!r}: an "
                          "answer held to the options leaves no room for reasoning; close the think block in "
                          "the prefix, or set probe_answers=free to probe with reasoning")
    if g.probe_max_tokens >= cfg.engine.max_model_len:
        raise ConfigError(f"grounding.probe_max_tokens={g.probe_max_tokens}: must be below engine.max_model_len="
                          f"{cfg.engine.max_model_len}")


def _validate_data(data: DataConfig) -> None:
    from data_pipelines.readers import FORMATS
    from data_pipelines.synthetic import FAMILIES, family_available

    if not data.synthetic.families:
        raise ConfigError("data.synthetic.families: give at least one family")
    if data.cold_start_manifest and not (data.train_manifest or data.train_mix):
        raise ConfigError("data.cold_start_manifest: needs data.train_manifest (or data.train_mix) and "
                          "data.eval_manifest too")
    if data.train_manifest and data.train_mix:
        raise ConfigError("data.train_manifest and data.train_mix: give one or the other")
    if bool(data.train_manifest or data.train_mix) != bool(data.eval_manifest):
        raise ConfigError("data.train_manifest (or data.train_mix) and data.eval_manifest: give both or neither")
    if data.mix_items and not data.train_mix:
        raise ConfigError("data.mix_items: needs data.train_mix")
    for i, src in enumerate(data.train_mix):
        if src.format not in FORMATS:
            raise ConfigError(f"data.train_mix[{i}].format={src.format!r}: must be one of {', '.join(FORMATS)}")
        if src.weight <= 0:
            raise ConfigError(f"data.train_mix[{i}].weight={src.weight!r}: must be positive")
    if data.audio.long_audio == "chunk" and data.audio.chunk_seconds > data.audio.max_seconds:
        raise ConfigError(f"data.audio.chunk_seconds={data.audio.chunk_seconds}: must be at most "
                          f"data.audio.max_seconds={data.audio.max_seconds}")
    for name in data.synthetic.families:
        if name not in FAMILIES:
            raise ConfigError(
                f"data.synthetic.families: unknown family {name!r} (known: {', '.join(sorted(FAMILIES))})"
            )
        if not data.train_manifest and not data.train_mix and not family_available(name):
            raise ConfigError(f"data.synthetic.families: {name!r} needs espeak-ng, which is not installed "
                              "(apt-get install espeak-ng)")


def _merged(path: str | Path | None, overrides: list[str] | tuple[str, ...]) -> DictConfig:
    merged = OmegaConf.structured(Config)
    if path is not None:
        try:
            preset = OmegaConf.load(path)
        except OSError as exc:
            raise ConfigError(f"{path}: cannot read the config ({exc.strerror})") from None
        except Exception as exc:  # YAML syntax errors carry their own line and column
            raise ConfigError(f"{path}: not valid YAML ({exc})") from None
        merged = _merge(merged, preset, f"in {path}")
    for item in overrides:
        if "=" not in item:
            raise ConfigError(f"override {item!r}: expected key=value")
    return _merge(merged, OmegaConf.from_dotlist(list(overrides)), "in a command-line override")


def _to_object(node: DictConfig) -> Any:
    try:
        return OmegaConf.to_object(node)
    except OmegaConfBaseException as exc:
        raise ConfigError(_describe(exc, "")) from None


def load_config(path: str | Path | None, overrides: list[str] | tuple[str, ...] = ()) -> Config:
    """Merge the schema, a YAML preset and `key=value` overrides; validate; return a typed Config.

    Raises ConfigError naming the offending key for unknown keys, wrong types and bad values.
    """
    merged = _merged(path, overrides)
    missing = sorted(OmegaConf.missing_keys(merged))
    if missing:
        raise ConfigError(f"missing required key(s): {', '.join(missing)}")
    cfg: Config = _to_object(merged)
    _validate(cfg)
    return cfg


def load_data_config(path: str | Path | None, overrides: list[str] | tuple[str, ...] = ()) -> DataConfig:
    """The `data` section alone, checked like load_config checks it (for `distill data`, which
    needs no run name or model)."""
    data: DataConfig = _to_object(_merged(path, overrides).data)
    _check_ranges(SimpleNamespace(data=data), "data.")
    _validate_data(data)
    return data


def _describe(exc: OmegaConfBaseException, where: str) -> str:
    key = getattr(exc, "full_key", None) or getattr(exc, "key", None)
    return f"config key {key!r}{' ' + where if where else ''}: {getattr(exc, 'msg', None) or exc}"


def _merge(base: DictConfig, layer: Any, where: str) -> DictConfig:
    try:
        return OmegaConf.merge(base, layer)  # type: ignore[return-value]
    except OmegaConfBaseException as exc:
        raise ConfigError(_describe(exc, where)) from None


def to_yaml(cfg: Config | DictConfig) -> str:
    """The resolved config as YAML (secrets are never part of the schema, so nothing to strip)."""
    return OmegaConf.to_yaml(OmegaConf.structured(cfg))


def config_diff(old: Config, new: Config) -> list[str]:
    """Dotted keys whose values differ between two configs."""
    a = _flatten(OmegaConf.to_container(OmegaConf.structured(old)))
    b = _flatten(OmegaConf.to_container(OmegaConf.structured(new)))
    return sorted(k for k in a.keys() | b.keys() if a.get(k) != b.get(k))


def _flatten(tree: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    out: dict[str, Any] = {}
    for key, value in tree.items():
        name = f"{prefix}.{key}" if prefix else str(key)
        if isinstance(value, dict):
            out.update(_flatten(value, name))
        else:
            out[name] = value
    return out
