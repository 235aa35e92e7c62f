"""The RL stage's pure parts: the rl config section, the reward terms and GRPO's arithmetic,
against hand-computed cases."""

import math

import pytest
import torch

from distill.config import load_config
from distill.core.schema import ConfigError
from distill.filter.config import FilterConfig
from distill.rl.config import RLConfig
from distill.rl.grpo import group_advantages, policy_loss, zero_variance_groups
from distill.rl.rewards import Rewards, overlong

CONTROL = ("<|im_start|>", "<|im_end|>", "<|AUDIO|>")


def trace(completion: str, reference: str = "high", num_tokens: int = 50, **extra) -> dict:
    return {
        "completion": completion,
        "reference": reference,
        "choices": ["high", "low"],
        "question": "Is the tone high or low?",
        "num_tokens": num_tokens,
        "finish_reason": "stop",
        **extra,
    }


GOOD = "<think>\nThe pitch is near 900 Hz, a high tone.\n</think>\nhigh"


def test_defaults_reproduce_step_audio_r1():
    cfg = load_config("configs/demo_cpu.yaml", ["output_dir=/tmp/x"])
    assert cfg.rl.rewards == {"correct": 0.8, "format": 0.2} and cfg.rl.band == [3, 6]
    rewards = Rewards(cfg.rl, cfg.filter, CONTROL)
    assert rewards(trace(GOOD))["reward"] == pytest.approx(1.0)
    assert rewards(trace(GOOD.replace("\nhigh", "\nlow")))["reward"] == pytest.approx(
        0.2
    )  # wrong, well formed
    assert rewards(trace("high"))["reward"] == pytest.approx(0.8)  # right, no reasoning
    assert rewards(trace("<think>\n</think>\nhigh"))["reward"] == pytest.approx(0.8)  # right, empty reasoning
    assert rewards(trace("<think>\n</think>\nlow"))["reward"] == 0.0  # empty reasoning, wrong


@pytest.mark.parametrize(
    ("override", "key"),
    [
        ("rl.rewards.corect=1.0", "rl.rewards.corect"),
        ("rl.band=[5,3]", "rl.band"),
        ("rl.band=[3,9]", "rl.band"),
        ("rl.band=[3]", "rl.band"),
        ("rl.loss_aggregation=mean", "rl.loss_aggregation"),
        ("rl.group_size=1", "rl.group_size"),
        ("rl.rewards.length=0.5", "rl.rewards.length"),
        ("rl.overlong_buffer=2000", "rl.overlong_buffer"),
        ("rl.prompts_per_step=3", "rl.prompts_per_step"),  # 2 training ranks share a step's prompts
        ("rl.max_response_tokens=1024", "rl.max_response_tokens"),  # no room left for the prompt
        ("sample.backend=server", "sample.backend"),  # RL samples on an engine beside the trainer
    ],
)
def test_bad_rl_values_fail_at_load_naming_the_key(override, key):
    with pytest.raises(ConfigError, match=key.replace(".", r"\.")):
        load_config("configs/demo_cpu.yaml", ["output_dir=/tmp/x", "rl.enabled=true", override])


def test_each_term_on_its_edge_cases():
    cfg = RLConfig(
        rewards={
            "correct": 1,
            "format": 1,
            "length": 1,
            "language": 1,
            "degeneration": 1,
            "judge": 1,
            "grounding": 1,
        },
        length_target=10,
        grounding_clip=0.5,
    )
    terms = Rewards(cfg, FilterConfig(), CONTROL)
    good = terms(trace(GOOD, reasoning_tokens=10, judge_score=7, dependence=0.25))
    assert good == pytest.approx(
        {
            "correct": 1,
            "format": 1,
            "length": 1,
            "language": 0,
            "degeneration": 0,
            "judge": 0.7,
            "grounding": 0.5,
            "overlong": 0,
            "reward": 4.2,
        }
    )
    # Length: linear on both sides of the target, 0 at twice it and beyond; no think block, 0.
    assert terms(trace(GOOD, reasoning_tokens=15))["length"] == pytest.approx(0.5)
    assert terms(trace(GOOD, reasoning_tokens=5))["length"] == pytest.approx(0.5)
    assert terms(trace(GOOD, reasoning_tokens=40))["length"] == 0
    assert terms(trace("high", reasoning_tokens=None))["length"] == 0
    # Penalties: another script, a loop.
    assert terms(trace(GOOD.replace("a high tone", "一个高音")))["language"] == -1
    assert terms(trace(GOOD.replace("a high tone.", "so it is high, " * 40)))["degeneration"] == -1
    # A control token breaks the format; a judge out of range is clipped; no judge, no score.
    assert terms(trace(GOOD.replace("high tone", "high <|AUDIO|> tone")))["format"] == 0
    assert terms(trace(GOOD, judge_score=14))["judge"] == 1 and terms(trace(GOOD))["judge"] == 0
    # Grounding: clipped both ways; a trace not scored earns nothing.
    assert terms(trace(GOOD, dependence=-3.0))["grounding"] == -1
    assert terms(trace(GOOD))["grounding"] == 0
    # A zero weight turns a term off.
    off = Rewards(RLConfig(rewards={"correct": 0.8, "format": 0.0}), FilterConfig(), CONTROL)
    assert set(off(trace(GOOD))) == {"correct", "overlong", "reward"}


def test_overlong_penalty_is_dapos_soft_ramp():
    cfg = RLConfig(max_response_tokens=100, overlong_buffer=20, overlong_penalty=0.5)
    assert [overlong(n, cfg) for n in (50, 80, 90, 100)] == pytest.approx([0, 0, -0.25, -0.5])
    assert overlong(100, RLConfig(max_response_tokens=100)) == 0  # no buffer: off


def test_group_advantages_by_hand():
    rewards = torch.tensor([1.0, 0.0, 0.0, 1.0, 1.0, 1.0, 1.0, 1.0, 0.2, 0.8, 0.2, 0.8])
    std = math.sqrt(4 * 0.25 / 3)  # Bessel-corrected, as TRL and verl
    adv = group_advantages(rewards, 4)
    expected = [0.5 / std, -0.5 / std, -0.5 / std, 0.5 / std, 0, 0, 0, 0]
    assert adv[:8].tolist() == pytest.approx(expected, abs=1e-5)
    assert adv[8:].tolist() == pytest.approx([-0.3 / (std * 0.6), 0.3 / (std * 0.6)] * 2, abs=1e-4)
    assert group_advantages(rewards, 4, scale=False)[:4].tolist() == pytest.approx([0.5, -0.5, -0.5, 0.5])
    assert zero_variance_groups(rewards, 4).tolist() == [False, True, False]


def test_policy_loss_by_hand():
    # Two responses of 3 token slots, the second with 2 tokens; the policy moved since sampling.
    logp_old = torch.log(torch.tensor([[0.5, 0.5, 0.5], [0.5, 0.5, 0.5]]))
    logp = torch.log(torch.tensor([[0.8, 0.5, 0.55], [0.2, 0.5, 0.9]]))
    mask = torch.tensor([[1, 1, 1], [1, 1, 0]])
    adv = torch.tensor([1.0, -2.0])
    # ratios: [1.6, 1.0, 1.1], [0.4, 1.0, -]; clip to [0.8, 1.2]:
    # response 1 (A=1): -min(r, clip(r)) = [-1.2, -1.0, -1.1]; 1.6 is clipped
    # response 2 (A=-2): -min(-2r, -2 clip(r)) = max(2r, 2 clip(r)) = [1.6, 2.0]; 0.4 is clipped
    per_token = [-1.2, -1.0, -1.1, 1.6, 2.0]

    def loss_of(policy=logp, **options):
        settings = {"clip_low": 0.2, "clip_high": 0.2, "aggregation": "token", "denominator": 5, **options}
        return policy_loss(policy, logp_old, adv, mask, **settings)

    loss, metrics = loss_of()
    assert loss.item() == pytest.approx(sum(per_token) / 5, abs=1e-6)
    assert metrics["clip_fraction"].item() == pytest.approx(2 / 5)
    seq, _ = loss_of(aggregation="sequence", denominator=2)
    assert seq.item() == pytest.approx((sum(per_token[:3]) / 3 + sum(per_token[3:]) / 2) / 2, abs=1e-6)
    # Clip-higher lets the positive-advantage token go to 1.6 (DAPO).
    high, m = loss_of(clip_high=0.7)
    assert high.item() == pytest.approx((-1.6 - 1.0 - 1.1 + 1.6 + 2.0) / 5, abs=1e-6)
    assert m["clip_fraction"].item() == pytest.approx(1 / 5)
    # KL (k3) to a reference equal to the policy is 0; to another, positive and added.
    assert loss_of(logp_ref=logp, kl_coef=0.1)[1]["kl"].item() == pytest.approx(0)
    with_kl, other = loss_of(logp_ref=logp_old, kl_coef=0.1)
    k3 = torch.exp(logp_old - logp) - (logp_old - logp) - 1
    assert other["kl"].item() == pytest.approx((k3 * mask).sum().item() / 5, abs=1e-6)
    assert with_kl.item() == pytest.approx(loss.item() + 0.1 * other["kl"].item(), abs=1e-6)
    # The gradient reaches only unclipped tokens.
    logp_g = logp.clone().requires_grad_(True)
    loss_of(logp_g)[0].backward()
    assert (logp_g.grad[0, 0], logp_g.grad[1, 0], logp_g.grad[1, 2]) == (0, 0, 0)
    assert logp_g.grad[0, 1] != 0 and logp_g.grad[1, 1] != 0


def test_band_and_step_prompts():
    from distill.rl.prompts import EmptyBandError, band_items, pass_counts, step_prompts

    traces = [{"item_id": f"i{k}", "right": j < k} for k in range(9) for j in range(8)]
    counts = pass_counts(traces, lambda t: t["right"])
    assert counts["i3"] == (3, 8) and counts["i0"] == (0, 8) and counts["i8"] == (8, 8)
    assert band_items(counts, [3, 6]) == ["i3", "i4", "i5", "i6"]
    with pytest.raises(EmptyBandError, match="of 2 items, 1 have fewer and 1 more"):
        band_items({"a": (0, 8), "b": (8, 8)}, [3, 6])
    items = [f"p{k}" for k in range(10)]
    steps = [step_prompts(items, s, 4, "0:1") for s in range(5)]
    # Each pass over the band takes every prompt once; steps follow from (seed, step) alone.
    assert sorted(steps[0] + steps[1] + steps[2][:2]) == items
    assert sorted(steps[2][2:] + steps[3] + steps[4]) == items
    assert steps[3] == step_prompts(items, 3, 4, "0:1") and steps[0] != step_prompts(items, 0, 4, "0:2")
    assert step_prompts(["a", "b"], 0, 5, "s").count("a") in (2, 3)  # more prompts than the band


def test_step_metrics_and_the_collapse_warning():
    from distill.rl.metrics import collapse_warning, step_metrics

    traces = [trace(GOOD, reasoning_tokens=n) for n in (10, 20, 30, 40, 100)]
    terms = [{"correct": c, "format": 1.0, "overlong": 0.0, "reward": 0.8 * c + 0.2} for c in (1, 1, 0, 0, 1)]
    m = step_metrics(3, terms, traces, dropped=1, groups=4)
    assert (
        m["step"] == 3 and m["accuracy"] == pytest.approx(0.6) and m["reward/reward"] == pytest.approx(0.68)
    )
    assert m["reasoning_tokens_mean"] == 40 and m["reasoning_tokens_p90"] == pytest.approx(76)
    assert m["groups_dropped_zero_variance"] == 1 and m["reward/format"] == 1
    assert collapse_warning(3000, 1400, 0.5) and "47%" in collapse_warning(3000, 1400, 0.5)
    assert collapse_warning(3000, 1600, 0.5) is None and collapse_warning(3000, 10, 0) is None
