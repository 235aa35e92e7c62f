"""The `rl` config section: on-policy GRPO on the questions the round's model solves only
sometimes (the Step-Audio-R1 recipe's RL), with the checks of its own values. Where each default
comes from is cited beside it."""

from __future__ import annotations

from dataclasses import dataclass, field

from distill.core.schema import ConfigError, check_choices, check_non_negative, check_positive

# Reward terms distill/rl/rewards.py defines, each a pure function of a trace.
REWARD_TERMS = ("correct", "format", "length", "language", "degeneration", "judge", "grounding")
LOSS_AGGREGATIONS = ("token", "sequence")
RL_MODES = ("after_train", "instead_of_train")
EMPTY_BAND = ("skip", "fail")
# Keys of the rl section a resumed run may change: how the work is done, not what it produces.
RESUMABLE = ("save_every", "collapse_warn_fraction")


@dataclass
class RLConfig:
    enabled: bool = False
    # "after_train": RL starts from the round's SFT student; "instead_of_train": from the round's
    # own model, and the round trains no SFT student.
    mode: str = "after_train"
    # The prompts RL learns from: those with band[0]..band[1] of the round's sample.n traces right
    # (Step-Audio-R1: 3 to 6 of 8; all right or all wrong gives every sample the same advantage).
    band: list[int] = field(default_factory=lambda: [3, 6])
    # What an empty band does to the round: "skip" (RL has nothing to learn, the round goes on
    # without it) or "fail" (the stage stops with the message).
    on_empty_band: str = "skip"
    # G samples per prompt (Step-Audio-R1's band is counted over 8).
    group_size: int = 8
    prompts_per_step: int = 8
    steps: int = 20
    temperature: float = 1.0
    top_p: float = 1.0
    # Response cap; DAPO's soft over-length punishment: within `overlong_buffer` tokens of the cap
    # the reward falls linearly, by up to `overlong_penalty` at the cap (0: off).
    max_response_tokens: int = 512
    overlong_buffer: int = 0
    overlong_penalty: float = 1.0
    # PPO clip range of the ratio: [1 - clip_low, 1 + clip_high] (GRPO: 0.2 both; DAPO's
    # "clip-higher" raises clip_high to 0.28 against entropy collapse).
    clip_low: float = 0.2
    clip_high: float = 0.2
    # KL to the reference (the round's starting model), k3 estimator; 0 (off) as in DAPO and
    # Dr. GRPO, which found it unnecessary for verifiable rewards.
    kl_coef: float = 0.0
    # "token": mean over every response token of the step (DAPO, Dr. GRPO: long answers are not
    # down-weighted); "sequence": mean per response, then over responses (the original GRPO).
    loss_aggregation: str = "token"
    # Divide group advantages by the group's reward std (GRPO); Dr. GRPO leaves it out.
    scale_rewards: bool = True
    # Drop groups whose rewards are all equal (zero advantage: no gradient; DAPO's dynamic sampling).
    drop_zero_variance: bool = True
    # Optimizer steps per rollout batch (1: strictly on-policy, the ratio is 1 at the first step).
    updates_per_step: int = 1
    # Constant after no warm-up (verl's and DAPO's RL default); the optimizer is the train
    # section's AdamW under its ZeRO stage, LoRA and trainable parts.
    learning_rate: float = 1e-6
    # Sampled responses per forward/backward pass on a rank (memory, not the result: the step's
    # loss is the same for any value).
    micro_batch_size: int = 8
    max_grad_norm: float = 1.0
    # Weighted reward terms (rl/rewards.py). Step-Audio-R1: 0.8 x correct + 0.2 x reasoning present.
    rewards: dict[str, float] = field(default_factory=lambda: {"correct": 0.8, "format": 0.2})
    # The length term: 1 at `length_target` reasoning tokens, falling linearly to 0 at 0 and at twice it.
    length_target: int = 0
    # The grounding term: audio dependence (nats per reasoning token, real audio minus this
    # counterfactual), clipped to [-grounding_clip, grounding_clip] and divided by it.
    grounding_against: str = "swap"
    grounding_clip: float = 1.0
    # Warn when the mean reasoning length of a step falls below this fraction of the first step's
    # (the collapse Step-Audio-R1 reports without the format term: ~3,000 to <1,500 tokens).
    collapse_warn_fraction: float = 0.5
    # Save weights, optimizer, RNG and the prompts used every this many steps (resume point).
    save_every: int = 5


def validate_rl(r: RLConfig, sample_n: int) -> None:
    """Check the rl section; reward term names are checked here, at config load."""
    check_choices(
        "rl",
        r,
        {
            "mode": RL_MODES,
            "on_empty_band": EMPTY_BAND,
            "loss_aggregation": LOSS_AGGREGATIONS,
            "grounding_against": ("silence", "noise", "swap"),
        },
    )
    check_positive(
        "rl",
        r,
        (
            "group_size",
            "prompts_per_step",
            "steps",
            "max_response_tokens",
            "updates_per_step",
            "micro_batch_size",
            "save_every",
            "temperature",
            "learning_rate",
            "grounding_clip",
        ),
    )
    check_non_negative(
        "rl",
        r,
        (
            "overlong_buffer",
            "overlong_penalty",
            "clip_low",
            "clip_high",
            "kl_coef",
            "length_target",
            "max_grad_norm",
        ),
    )
    # The band counts right answers among the round's sample.n traces (held to it once RL is on).
    top = sample_n if r.enabled else max(sample_n, *r.band)
    if len(r.band) != 2 or not 0 <= r.band[0] <= r.band[1] <= top:
        raise ConfigError(
            f"rl.band: expected [low, high] with 0 <= low <= high <= sample.n={sample_n}, got {r.band}"
        )
    if r.group_size < 2:
        raise ConfigError(f"rl.group_size: a group needs at least 2 samples to compare, got {r.group_size}")
    if r.overlong_buffer >= r.max_response_tokens:
        raise ConfigError("rl.overlong_buffer: must be below rl.max_response_tokens")
    if not 0 < r.top_p <= 1:
        raise ConfigError(f"rl.top_p: expected a value in (0, 1], got {r.top_p}")
    if not 0 <= r.collapse_warn_fraction <= 1:
        raise ConfigError(
            f"rl.collapse_warn_fraction: expected a value in [0, 1], got {r.collapse_warn_fraction}"
        )
    if not r.rewards:
        raise ConfigError("rl.rewards: name at least one reward term")
    for name in r.rewards:
        if name not in REWARD_TERMS:
            raise ConfigError(f"rl.rewards.{name}: unknown reward term (known: {', '.join(REWARD_TERMS)})")
    if "length" in r.rewards and not r.length_target:
        raise ConfigError("rl.rewards.length: set rl.length_target (reasoning tokens) for the length term")
