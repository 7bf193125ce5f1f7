"""Group-relative advantages: the "G" in GRPO (arXiv 2402.03300, §4.1.2, as arXiv 2503.19948 uses it).

Every prompt is answered G times; each completion's reward is compared with the other
completions *of the same prompt*, so no value network is needed:

    A_i = (r_i − mean(r_1..r_G)) / (std(r_1..r_G) + eps)

Two variants change only the divisor (``grpo.scale_rewards``, chosen from ``ADVANTAGE_SCALINGS``):
``none`` drops it (Dr. GRPO, ``centred_advantages``) and ``batch`` divides by the std of the
whole batch instead of the group's (``batch_scaled_advantages``). The paper's ``group`` is the default.

Shape key: ``B`` prompts, ``G`` completions per prompt (group size).

Conventions (docs/math.md):

- ``std`` is the *unbiased* sample standard deviation (``torch.std``, divisor G − 1), as in the
  GRPO paper's reference code and TRL. The biased std would scale every advantage by
  sqrt(G / (G − 1)).
- A group whose rewards are all equal carries no learning signal: its advantages are exactly 0.
  The formula nearly gives that on its own (numerator ≈ 0, denominator eps), but a float mean of
  equal values can be off by one ulp (mean([0.1, 0.1, 0.1]) ≠ 0.1), so such groups are zeroed
  explicitly.
- G = 1: torch.std of a single element is NaN (divisor 0). A lone completion has nothing to be
  compared with, so its advantage is defined as 0.
"""

from __future__ import annotations

import torch
from torch import Tensor


def zero_spread(rewards_BG: Tensor) -> Tensor:
    """True for the groups whose reward std is zero: all G rewards exactly equal (G = 1 included).

    Tested by equality rather than ``std == 0`` because a float std of equal values can be one ulp
    above 0. Such a group teaches nothing under any scaling below. Shape (B, G) → (B,).
    """
    return (rewards_BG == rewards_BG[:, :1]).all(dim=1)


def _check_rewards(rewards_BG: Tensor) -> None:
    assert rewards_BG.dim() == 2, f"rewards must be (B, G), got shape {tuple(rewards_BG.shape)}"
    assert rewards_BG.is_floating_point(), f"rewards must be floating point, got {rewards_BG.dtype}"
    assert torch.isfinite(rewards_BG).all(), "rewards must be finite"


def group_advantages(rewards_BG: Tensor, eps: float = 1e-4) -> Tensor:
    """Normalise each group's rewards: A_i = (r_i − μ_group) / (σ_group + eps).

    | argument     | symbol | shape  |
    |--------------|--------|--------|
    | rewards_BG   | r      | (B, G) |
    | eps          | —      | float, keeps A finite for tiny but non-zero spreads |
    | returns      | A      | (B, G) |

    σ is the unbiased std over the group. A zero-spread group (and every group when G = 1) gets
    all-zero advantages, never NaN.
    """
    _check_rewards(rewards_BG)
    if rewards_BG.shape[1] == 1:
        return torch.zeros_like(rewards_BG)  # nothing to compare with (and torch.std would be NaN)
    mean_B1 = rewards_BG.mean(dim=1, keepdim=True)
    std_B1 = rewards_BG.std(dim=1, keepdim=True)  # unbiased: divisor G − 1
    adv_BG = (rewards_BG - mean_B1) / (std_B1 + eps)
    return torch.where(zero_spread(rewards_BG)[:, None], torch.zeros_like(adv_BG), adv_BG)


def centred_advantages(rewards_BG: Tensor) -> Tensor:
    """Dr. GRPO (Liu et al., arXiv 2503.20783): the group mean subtracted, no division by the std.

        A_i = r_i − mean(r_1..r_G)

    Dividing by the group std gives groups whose rewards barely differ (all but one right, say)
    the same weight as contested ones; without it an advantage keeps the reward's own units.
    Zero-spread groups get exactly 0. Shapes (B, G) → (B, G).
    """
    _check_rewards(rewards_BG)
    adv_BG = rewards_BG - rewards_BG.mean(dim=1, keepdim=True)
    return torch.where(zero_spread(rewards_BG)[:, None], torch.zeros_like(adv_BG), adv_BG)


def batch_scaled_advantages(rewards_BG: Tensor, eps: float = 1e-4) -> Tensor:
    """The group mean subtracted, divided by the std of the whole batch (``scale_rewards="batch"``).

        A_i = (r_i − mean(group of i)) / (std(all B·G rewards) + eps)

    The group-mean / batch-std combination recommended by Liu et al., "Part I: Tricks or Traps? A
    Deep Dive into RL for LLM Reasoning" (arXiv 2508.08221); TRL's
    ``scale_rewards="batch"``. One divisor for the batch keeps the advantages of a nearly unanimous
    group small instead of blowing them up to ±1. σ is the unbiased std over the N = B·G rewards;
    zero-spread groups get exactly 0. With B = 1 it equals ``group_advantages``. Shapes (B, G) → (B, G).
    """
    _check_rewards(rewards_BG)
    if rewards_BG.numel() < 2:
        return torch.zeros_like(rewards_BG)
    adv_BG = (rewards_BG - rewards_BG.mean(dim=1, keepdim=True)) / (rewards_BG.std() + eps)
    return torch.where(zero_spread(rewards_BG)[:, None], torch.zeros_like(adv_BG), adv_BG)


ADVANTAGE_SCALINGS = {"group": group_advantages, "batch": batch_scaled_advantages, "none": centred_advantages}


def group_stats(rewards_BG: Tensor) -> dict[str, float]:
    """Logging figures for a batch of groups.

    - ``reward_mean``: mean reward over all B·G completions.
    - ``reward_std``: the within-group (unbiased) std, averaged over the B groups; 0 for G = 1.
    - ``frac_zero_std``: the fraction of groups whose rewards are all equal, i.e. groups that
      contribute no gradient. A value near 1 means the policy has collapsed (or the task is too
      easy / too hard for the current policy) and GRPO has stopped learning. Also logged as
      ``frac_reward_zero_std``, TRL's name for it.
    """
    assert rewards_BG.dim() == 2, f"rewards must be (B, G), got shape {tuple(rewards_BG.shape)}"
    rewards_BG = rewards_BG.double()
    if rewards_BG.shape[1] == 1:
        std_B = torch.zeros(rewards_BG.shape[0], dtype=rewards_BG.dtype)
    else:
        std_B = rewards_BG.std(dim=1)
    return {
        "reward_mean": float(rewards_BG.mean()),
        "reward_std": float(std_B.mean()),
        "frac_zero_std": float(zero_spread(rewards_BG).double().mean()),
        "frac_reward_zero_std": float(zero_spread(rewards_BG).double().mean()),
    }
