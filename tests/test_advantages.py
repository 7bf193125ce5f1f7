"""Group advantages against hand-computed numbers (conventions: docs/math.md)."""

import torch
from torch.testing import assert_close

from grpo.advantages import group_advantages, group_stats


def test_two_right_two_wrong_gives_plus_minus_0866():
    # mean = 0.5; unbiased var = 4 · 0.25 / 3 = 1/3 → std = 0.577350;
    # A = ±0.5 / (0.577350 + 1e-4) = ±0.865875
    adv = group_advantages(torch.tensor([[1.0, 0.0, 0.0, 1.0]]))
    expected = 0.5 / (3**-0.5 + 1e-4)
    assert_close(adv, torch.tensor([[expected, -expected, -expected, expected]]))
    assert abs(expected - 0.865875) < 1e-6


def test_groups_are_normalised_independently():
    # row 0: [3, 1] → mean 2, unbiased std = sqrt(2) = 1.414214 → A = ±1/1.414314 = ±0.707057
    # row 1: [0, 1] → mean 0.5, unbiased std = sqrt(0.5) = 0.707107 → A = ±0.5/0.707207 = ±0.707007
    adv = group_advantages(torch.tensor([[3.0, 1.0], [0.0, 1.0]]))
    a, b = 1.0 / (2**0.5 + 1e-4), 0.5 / (0.5**0.5 + 1e-4)
    assert_close(adv, torch.tensor([[a, -a], [-b, b]]))
    # [0, 0.5, 1] → mean 0.5, std = sqrt((0.25 + 0 + 0.25)/2) = 0.5 → A = (−0.5, 0, 0.5)/0.5001
    adv3 = group_advantages(torch.tensor([[0.0, 0.5, 1.0]]))
    assert_close(adv3, torch.tensor([[-0.5 / 0.5001, 0.0, 0.5 / 0.5001]]))


def test_zero_variance_group_is_exactly_zero():
    # mean([0.1]*3) is 0.10000000000000002 in float64, one ulp off: without the explicit zeroing
    # the advantages would be ~1e-13 instead of 0.
    rewards = torch.tensor([[0.1, 0.1, 0.1], [1.0, 1.0, 1.0], [0.0, 1.0, 0.0]], dtype=torch.float64)
    adv = group_advantages(rewards)
    assert torch.isfinite(adv).all()
    assert (adv[:2] == 0).all()
    assert (adv[2] != 0).all()


def test_group_of_one_is_zero_not_nan():
    # torch.std of one element is NaN (divisor G − 1 = 0); a lone completion gets A = 0.
    adv = group_advantages(torch.tensor([[0.7], [0.0]]))
    assert_close(adv, torch.zeros(2, 1))


def test_advantages_sum_to_zero_per_group():
    rewards = torch.rand(5, 8, generator=torch.Generator().manual_seed(0))
    assert_close(group_advantages(rewards).sum(dim=1), torch.zeros(5), atol=1e-5, rtol=0)


def test_group_stats():
    # groups: [1,0,0,1] std 0.577350; [1,1,1,1] std 0; [0,0,0,0] std 0 → mean std 0.192450
    # reward mean = 6 / 12 = 0.5; zero-spread groups 2 of 3
    stats = group_stats(torch.tensor([[1.0, 0.0, 0.0, 1.0], [1.0, 1.0, 1.0, 1.0], [0.0, 0.0, 0.0, 0.0]]))
    assert stats.keys() == {"reward_mean", "reward_std", "frac_zero_std", "frac_reward_zero_std"}
    assert_close(stats["reward_mean"], 0.5)
    assert_close(stats["reward_std"], 3**-0.5 / 3)
    assert_close(stats["frac_zero_std"], 2 / 3)
    # G = 1: no spread to measure; every group counts as zero-spread
    stats1 = group_stats(torch.tensor([[0.25], [0.5]]))
    assert stats1 == {
        "reward_mean": 0.375,
        "reward_std": 0.0,
        "frac_zero_std": 1.0,
        "frac_reward_zero_std": 1.0,
    }
