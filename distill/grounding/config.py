"""The `grounding` config section: counterfactual probes and audio-dependence scoring, with the
checks of its own values."""

from __future__ import annotations

from dataclasses import dataclass, field

from distill.core.prompts import THINK_CLOSE, THINK_OPEN
from distill.core.schema import ConfigError, check_choices, check_non_negative, check_positive

# Counterfactual audio inputs (grounding/counterfactual.py), also eval's grounding gap.
KINDS = ("silence", "noise", "swap")
# Keys of this section a resumed run may change without invalidating finished work: the real
# audio's log-probabilities, from sampling or a pass (traces sampled without them are scored by a
# pass, so a round may mix the two), and the same scores, read through the prefix cache or not.
RESUMABLE = ("real_logprobs", "reuse_prefix_cache")


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
    # The traces of text-solvable items: "drop" them, "downweight" them in training, or "keep" them
    # (flag only).
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


def validate(g: GroundingConfig) -> None:
    """Raise ConfigError for the first bad value of the `grounding` section (beyond the kinds it
    names, only when grounding is enabled)."""
    check_choices(
        "grounding",
        g,
        {
            "text_solvable": ("drop", "downweight", "keep"),
            "score_traces": ("keepable", "passing", "all"),
            "probe_items": ("keepable", "all"),
            "real_logprobs": ("sampled", "scored"),
            "probe_answers": ("options", "free"),
        },
    )
    check_positive("grounding", g, ("probe_max_tokens", "score_batch"))
    check_non_negative(
        "grounding",
        g,
        (
            "probe_samples",
            "probe_temperature",
            "text_solvable_margin",
            "text_solvable_weight",
            "bank_seconds",
        ),
    )
    for key in ("counterfactuals", "score_against"):
        unknown = [k for k in getattr(g, key) if k not in KINDS]
        if unknown:
            raise ConfigError(
                f"grounding.{key}: unknown counterfactual(s) {', '.join(unknown)} (known: {', '.join(KINDS)})"
            )
    if not g.enabled:
        return
    if g.probe_samples and not g.counterfactuals:
        raise ConfigError(
            "grounding.probe_samples: probing needs at least one kind in grounding.counterfactuals "
            "(or set grounding.probe_samples=0)"
        )
    if g.probe_samples > 1 and g.probe_temperature == 0:
        raise ConfigError(
            f"grounding.probe_temperature=0 with grounding.probe_samples={g.probe_samples}: greedy "
            "decoding gives one answer; raise the temperature or set probe_samples=1"
        )
    if g.text_solvable_weight > 1:
        raise ConfigError(f"grounding.text_solvable_weight={g.text_solvable_weight}: must be in [0, 1]")
    if g.probe_answers == "options" and g.probe_prefix.count(THINK_OPEN) > g.probe_prefix.count(THINK_CLOSE):
        raise ConfigError(
            f"grounding.probe_answers=options with grounding.probe_prefix={g.probe_prefix!r}: an "
            "answer held to the options leaves no room for reasoning; close the think block in "
            "the prefix, or set probe_answers=free to probe with reasoning"
        )
