"""The `filter` config section: which traces are kept (rule checks, answer matching, pass-rate band,
selection, reward weights, lexical terms, the optional LLM judge), with the checks of its own values."""

from __future__ import annotations

from dataclasses import dataclass, field

from distill.core.schema import ConfigError, check_choices, check_non_negative, check_positive

# Rule checks of the filter stage (distill/filter/checks.py), in the order they run.
RULE_CHECKS = (
    "finished",
    "control_tokens",
    "format",
    "length",
    "language",
    "degeneration",
    "self_cognition",
    "correct",
    "agreement",
    "acoustic_terms",
)
# Checks the filter adds from the grounding stage's measurements (distill/grounding).
GROUNDING_CHECKS = ("text_solvable", "audio_dependence")
KEEP_POLICIES = ("first", "shortest", "diverse")
# The scripts filter/checks.py SCRIPTS gives Unicode ranges for, in its order.
SCRIPT_NAMES = ("latin", "greek", "cyrillic", "arabic", "devanagari", "cjk", "hangul")
# Keys of this section a resumed run may change: how the judge is called, not what it decides.
RESUMABLE = ("judge.concurrency", "judge.timeout_s", "judge.retries", "judge.backoff_s")


@dataclass
class JudgeConfig:
    """An optional LLM judge: an OpenAI-compatible endpoint (e.g. `vllm serve` of a judge model)
    scores each trace that passed the rule checks, with the audio attached."""

    enabled: bool = False
    base_url: str = "http://127.0.0.1:8000/v1"
    # Served model name ("": the first model the server lists).
    model: str = ""
    rubric: str = (
        "You grade a step-by-step answer to a question about an audio clip. Give a high score only if "
        "the reasoning is grounded in acoustic features actually heard (pitch, loudness, duration, rhythm, "
        "timbre, noise, timing) rather than an imagined transcript, is logically coherent, and supports the "
        "final answer. Reply with one line: 'Score: N' with N from 0 to 10."
    )
    min_score: float = 6.0
    # vLLM servers only: constrain the reply to this regex (structured outputs), e.g. "Score: (10|[0-9])".
    score_regex: str = ""
    # As sample.server's: per request; `retries` of a timeout, connection error or 5xx/429 answer, waiting
    # backoff_s, 2 backoff_s, ... between attempts.
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

    acoustic_terms: dict[str, list[str]] = field(
        default_factory=lambda: {
            "en": [
                "hz",
                "pitch",
                "frequenc",
                "tone",
                "tonal",
                "loud",
                "quiet",
                "decibel",
                " db",
                "volume",
                "amplitude",
                "duration",
                "lasts",
                "seconds",
                " ms",
                "millisecond",
                "rhythm",
                "tempo",
                "beat",
                "bpm",
                "timbre",
                "noise",
                "noisy",
                "onset",
                "harmonic",
                "spectr",
                "energy",
                " rms",
                "envelope",
                "silen",
                "echo",
                "reverb",
                "timing",
                "interval",
                "pulse",
                "click",
                "resonan",
                "formant",
                "vibrato",
                "bass",
                "treble",
                "fundamental",
                "overtone",
                "waveform",
                "sustain",
                "decay",
            ],
            "zh": [
                "音高",
                "频率",
                "赫兹",
                "响度",
                "音量",
                "分贝",
                "时长",
                "节奏",
                "节拍",
                "速度",
                "音色",
                "噪声",
                "噪音",
                "谐波",
                "频谱",
                "能量",
                "静音",
                "回声",
                "混响",
                "音调",
                "基频",
                "秒",
            ],
        }
    )
    # Transcript-only language; named in the reason of a trace that cites no acoustic term.
    transcript_terms: dict[str, list[str]] = field(
        default_factory=lambda: {
            "en": [
                "says",
                "said",
                "saying",
                "the words",
                "the word ",
                "transcript",
                "the text",
                "sentence",
                "mention",
                "lyrics",
                "the speaker states",
            ],
            "zh": ["说", "文字", "转写", "文本", "句子", "提到", "歌词"],
        }
    )
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
    # distill/filter/checks.py SCRIPTS): e.g. [latin] rejects stray Chinese in English traces.
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


def validate(f: FilterConfig) -> None:
    """Raise ConfigError for the first bad value of the `filter` section."""
    check_choices("filter", f, {"keep_policy": KEEP_POLICIES})
    check_choices("filter.judge", f.judge, {"on_error": ("reject", "keep")})
    check_positive("filter", f, ("keep_per_prompt", "repeat_window", "max_repeats", "repeat_max_period"))
    check_positive("filter.judge", f.judge, ("timeout_s", "concurrency", "max_tokens"))
    check_non_negative(
        "filter", f, ("min_reasoning_tokens", "max_reasoning_tokens", "number_rel_tol", "number_abs_tol")
    )
    check_non_negative("filter.judge", f.judge, ("retries", "backoff_s"))
    check_non_negative("filter.lexical", f.lexical, ("min_acoustic_terms",))
    for key in ("acoustic_terms", "transcript_terms"):
        for lang, terms in getattr(f.lexical, key).items():
            if any(not t.strip() for t in terms):
                raise ConfigError(f"filter.lexical.{key}.{lang}: an empty term would match every trace")
    distinct = len({t.lower() for terms in f.lexical.acoustic_terms.values() for t in terms})
    if "acoustic_terms" in f.checks and f.lexical.min_acoustic_terms > distinct:
        raise ConfigError(
            f"filter.lexical.min_acoustic_terms={f.lexical.min_acoustic_terms}: more than the "
            f"{distinct} distinct terms of filter.lexical.acoustic_terms"
        )
    unknown = [c for c in f.checks if c not in RULE_CHECKS]
    if unknown:
        raise ConfigError(
            f"filter.checks: unknown check(s) {', '.join(unknown)} (known: {', '.join(RULE_CHECKS)})"
        )
    bad = [k for k in f.reward_weights if k not in (*RULE_CHECKS, *GROUNDING_CHECKS, "judge")]
    if bad:
        raise ConfigError(f"filter.reward_weights: unknown check(s) {', '.join(bad)}")
    if not 0.0 <= f.pass_rate_min <= f.pass_rate_max <= 1.0:
        raise ConfigError(
            f"filter.pass_rate_min={f.pass_rate_min}, filter.pass_rate_max={f.pass_rate_max}: "
            "need 0 <= min <= max <= 1"
        )
    if not 0.0 < f.near_duplicate <= 1.0:
        raise ConfigError(f"filter.near_duplicate={f.near_duplicate}: must be in (0, 1]")
    scripts = [s for s in f.allowed_scripts if s != "auto" and s not in SCRIPT_NAMES]
    if scripts or not f.allowed_scripts:
        raise ConfigError(
            f"filter.allowed_scripts={f.allowed_scripts}: use 'auto' and/or {', '.join(SCRIPT_NAMES)}"
        )
    if f.max_reasoning_tokens and f.max_reasoning_tokens < f.min_reasoning_tokens:
        raise ConfigError(
            f"filter.max_reasoning_tokens={f.max_reasoning_tokens}: below filter.min_reasoning_tokens"
        )
    if f.max_repeats < 2:
        raise ConfigError(
            f"filter.max_repeats={f.max_repeats}: must be at least 2 (a block seen twice in a row)"
        )
    if f.repeat_window > f.repeat_max_period:
        raise ConfigError(
            f"filter.repeat_window={f.repeat_window}: must be at most filter.repeat_max_period="
            f"{f.repeat_max_period}"
        )
    negative = [k for k, w in f.reward_weights.items() if w < 0]
    if negative:
        raise ConfigError(f"filter.reward_weights: negative weight(s) for {', '.join(negative)}")
    if "correct" not in f.checks and (f.pass_rate_min > 0 or f.pass_rate_max < 1):
        raise ConfigError(
            "filter.pass_rate_min/max: a pass-rate band needs the 'correct' check in filter.checks"
        )
    if f.verifier and ":" not in f.verifier:
        raise ConfigError(f"filter.verifier={f.verifier!r}: expected 'package.module:function'")
