"""GRPO's arithmetic: group-relative advantages and the clipped policy-gradient loss, as pure
tensor functions (the RL stage feeds them; tests check them against hand-computed cases).

Advantages (DeepSeekMath's GRPO): a sample's reward minus its group's mean, divided by the group's
standard deviation (Bessel-corrected, as TRL and verl compute it) unless `scale` is off (Dr. GRPO).
Loss (PPO's clipped surrogate per token): -min(r A, clip(r, 1 - clip_low, 1 + clip_high) A) with
r = exp(logp - logp_old), plus kl_coef x the k3 estimate of KL(policy || reference) when asked,
aggregated over tokens ("token": DAPO, Dr. GRPO) or per sequence first ("sequence": GRPO).
"""

from __future__ import annotations

import torch


def group_advantages(
    rewards: torch.Tensor, group_size: int, scale: bool = True, eps: float = 1e-6
) -> torch.Tensor:
    """Advantages of rewards laid out group after group (G consecutive samples per prompt)."""
    groups = rewards.view(-1, group_size)
    advantages = groups - groups.mean(dim=1, keepdim=True)
    if scale:
        advantages = advantages / (groups.std(dim=1, keepdim=True) + eps)
    return advantages.reshape(-1)


def zero_variance_groups(rewards: torch.Tensor, group_size: int) -> torch.Tensor:
    """Per group, whether all its rewards are equal: every advantage 0, no gradient (DAPO drops them)."""
    groups = rewards.view(-1, group_size)
    return (groups == groups[:, :1]).all(dim=1)


def policy_loss(
    logp: torch.Tensor,
    logp_old: torch.Tensor,
    advantages: torch.Tensor,
    mask: torch.Tensor,
    *,
    clip_low: float,
    clip_high: float,
    aggregation: str,
    denominator: float,
    logp_ref: torch.Tensor | None = None,
    kl_coef: float = 0.0,
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """The loss of a micro-batch of responses ([B, T] log-probabilities of the sampled tokens under
    the policy, the policy that sampled them and the reference; `mask` 1 on response tokens) and
    its metrics. `denominator` makes micro-batches and ranks add up to the step's loss: the step's
    response tokens for "token" aggregation, its responses for "sequence"."""
    mask = mask.to(logp.dtype)
    ratio = torch.exp(logp - logp_old)
    adv = advantages.unsqueeze(1)
    per_token = torch.maximum(-adv * ratio, -adv * ratio.clamp(1 - clip_low, 1 + clip_high))
    kl = torch.zeros_like(logp)
    if logp_ref is not None and kl_coef:
        log_ratio = logp_ref - logp
        kl = torch.exp(log_ratio) - log_ratio - 1  # k3: unbiased, always >= 0
        per_token = per_token + kl_coef * kl
    if aggregation == "token":
        loss = (per_token * mask).sum() / denominator
    else:
        loss = ((per_token * mask).sum(dim=1) / mask.sum(dim=1).clamp(min=1)).sum() / denominator
    clipped = ((ratio < 1 - clip_low) & (adv < 0)) | ((ratio > 1 + clip_high) & (adv > 0))
    tokens = mask.sum().clamp(min=1)
    metrics = {
        "clip_fraction": (clipped.to(mask.dtype) * mask).sum().detach() / tokens,
        "kl": (kl * mask).sum().detach() / tokens,
        "ratio_mean": (ratio * mask).sum().detach() / tokens,
    }
    return loss, metrics
