"""The GRPO loss: hand-computed values, the clip's four cases, and a slow per-token reference."""

import math

import pytest
import torch
from torch.testing import assert_close

from grpo.loss import grpo_loss, kl_k1, kl_k3

STAT_KEYS = {
    "loss",
    "kl",
    "clip_frac",
    "clip_frac_low",
    "clip_frac_high",
    "ratio_mean",
    "ratio_min",
    "ratio_max",
}


def test_k3_kl_hand_computed():
    # π = 0.5, π_ref = 0.25: d = ln .25 − ln .5 = −0.693147; k3 = e^d − d − 1 = 0.5 + 0.693147 − 1
    k3 = kl_k3(torch.tensor([[math.log(0.5)]]), torch.tensor([[math.log(0.25)]]))
    assert_close(k3, torch.tensor([[0.193147]]))


def test_k1_kl_hand_computed():
    # k1 = ln π − ln π_ref = ln .5 − ln .25 = ln 2 = 0.693147; swapped it is negative
    assert_close(
        kl_k1(torch.tensor([[math.log(0.5)]]), torch.tensor([[math.log(0.25)]])), torch.tensor([[0.693147]])
    )
    assert_close(
        kl_k1(torch.tensor([[math.log(0.25)]]), torch.tensor([[math.log(0.5)]])), torch.tensor([[-0.693147]])
    )


def test_k3_is_nonnegative_and_zero_at_equality():
    g = torch.Generator().manual_seed(0)
    logp, ref = -3 * torch.rand(4, 9, generator=g), -3 * torch.rand(4, 9, generator=g)
    assert (kl_k3(logp, ref) >= 0).all()
    assert_close(kl_k3(logp, logp), torch.zeros(4, 9))


def test_clip_all_cases_values_and_gradients():
    # One token per completion, old log-prob 0, so ρ = exp(logp). ε = 0.2, β = 0, N = 6.
    #   A    ρ    ρA    clip(ρ)A  surrogate  clipped?  ∂loss/∂logp = −A·ρ/6 unless clipped
    #  +1   1.1   1.1    1.1       1.1       no        −0.183333
    #  +1   1.5   1.5    1.2       1.2       yes        0
    #  +1   0.5   0.5    0.8       0.5       no        −0.083333
    #  −1   0.9  −0.9   −0.9      −0.9       no        +0.15
    #  −1   0.5  −0.5   −0.8      −0.8       yes        0
    #  −1   1.5  −1.5   −1.2      −1.5       no        +0.25
    # loss = −mean(surrogate) = −(1.1 + 1.2 + 0.5 − 0.9 − 0.8 − 1.5)/6 = 0.4/6 = 0.066667
    ratios = torch.tensor([1.1, 1.5, 0.5, 0.9, 0.5, 1.5], dtype=torch.float64)
    adv = torch.tensor([1.0, 1.0, 1.0, -1.0, -1.0, -1.0], dtype=torch.float64)
    logp = ratios.log()[:, None].requires_grad_()
    old = torch.zeros(6, 1, dtype=torch.float64)
    loss, stats = grpo_loss(logp, old, None, adv, torch.ones(6, 1), clip_eps=0.2, kl_coef=0.0)
    loss.backward()
    assert_close(loss, torch.tensor(0.4 / 6, dtype=torch.float64))
    expected_grad = torch.tensor([-1.1, 0.0, -0.5, 0.9, 0.0, 1.5], dtype=torch.float64)[:, None] / 6
    assert_close(logp.grad, expected_grad)
    assert_close(stats["clip_frac"], 2 / 6)
    assert_close(stats["ratio_min"], 0.5)
    assert_close(stats["ratio_max"], 1.5)
    assert_close(stats["ratio_mean"], 6.0 / 6)  # (1.1 + 1.5 + 0.5 + 0.9 + 0.5 + 1.5)/6 = 1.0


def test_seq_mean_vs_token_mean_on_ragged_mask():
    # ρ ≡ 1 (old_logp=None), β = 0, so loss_it = −A_i on real tokens. A = (1, −2, 5).
    # Completion lengths 3, 1, 0 (the third is empty). Padding holds garbage log-probs.
    # seq-mean:   per-completion means (−1, 2, 0) → (−1 + 2 + 0)/3 = 1/3
    #             ∂/∂logp: −A_i/(|o_i|·N) → −1/9 on row 0, +2/3 on row 1's token, 0 elsewhere
    # token-mean: (−1·3 + 2·1)/4 = −0.25; ∂/∂logp = −A_i/4 → −0.25 on row 0, +0.5 on row 1's token
    mask = torch.tensor([[1, 1, 1], [1, 0, 0], [0, 0, 0]], dtype=torch.bool)
    adv = torch.tensor([1.0, -2.0, 5.0])
    garbage = torch.tensor([[-1.0, -2.0, -0.5], [-0.3, 80.0, -1e4], [1e4, -1e4, 90.0]])
    for agg, expected_loss, expected_grad in [
        ("seq-mean", 1 / 3, [[-1 / 9] * 3, [2 / 3, 0, 0], [0, 0, 0]]),
        ("token-mean", -0.25, [[-0.25] * 3, [0.5, 0, 0], [0, 0, 0]]),
    ]:
        logp = garbage.clone().requires_grad_()
        loss, stats = grpo_loss(logp, None, None, adv, mask, kl_coef=0.0, loss_agg=agg)
        loss.backward()
        assert_close(loss, torch.tensor(expected_loss))
        assert_close(logp.grad, torch.tensor(expected_grad))
        assert stats["ratio_min"] == stats["ratio_max"] == stats["ratio_mean"] == 1.0


def test_garbage_in_padding_never_leaks():
    # Huge log-prob differences at padding would overflow exp(); they must not reach the loss.
    mask = torch.tensor([[1, 0], [1, 1]], dtype=torch.float32)
    logp = torch.tensor([[-1.0, 500.0], [-1.0, -2.0]], requires_grad=True)
    old = torch.tensor([[-1.0, -500.0], [-1.0, -2.0]])
    ref = torch.tensor([[-1.0, 900.0], [-1.0, -2.0]])
    loss, stats = grpo_loss(logp, old, ref, torch.tensor([1.0, -1.0]), mask)
    loss.backward()
    assert torch.isfinite(loss) and torch.isfinite(logp.grad).all() and logp.grad[0, 1] == 0
    assert stats["ratio_max"] == 1.0 and stats["kl"] == 0.0


def reference_loss(logp, old, ref, adv, mask, clip_eps, kl_coef, estimator, agg):
    """The obvious per-token loop: every token's term written out with scalar tensors."""
    seq_means, all_terms = [], []
    for i in range(logp.shape[0]):
        terms = []
        for t in range(logp.shape[1]):
            if not mask[i, t]:
                continue
            ratio = torch.exp(logp[i, t] - old[i, t])
            if ratio > 1 + clip_eps:
                clipped_ratio = torch.tensor(1 + clip_eps, dtype=logp.dtype)
            elif ratio < 1 - clip_eps:
                clipped_ratio = torch.tensor(1 - clip_eps, dtype=logp.dtype)
            else:
                clipped_ratio = ratio
            surrogate = torch.minimum(ratio * adv[i], clipped_ratio * adv[i])
            if estimator == "k3":
                kl = torch.exp(ref[i, t] - logp[i, t]) - (ref[i, t] - logp[i, t]) - 1
            else:
                kl = logp[i, t] - ref[i, t]
            terms.append(-(surrogate - kl_coef * kl))
        all_terms += terms
        seq_means.append(sum(terms) / len(terms) if terms else torch.zeros((), dtype=logp.dtype))
    if agg == "seq-mean":
        return sum(seq_means) / len(seq_means)
    return sum(all_terms) / len(all_terms)


@pytest.mark.parametrize("estimator", ["k3", "k1"])
@pytest.mark.parametrize("agg", ["seq-mean", "token-mean"])
@pytest.mark.parametrize("kl_coef", [0.0, 0.04, 0.5])
def test_loss_and_gradient_match_per_token_loop(estimator, agg, kl_coef):
    g = torch.Generator().manual_seed(1)
    N, T = 6, 7
    lengths = torch.tensor([7, 3, 1, 0, 5, 6])
    mask = torch.arange(T)[None, :] < lengths[:, None]  # (N, T), ragged, one empty completion
    logp_data = -2 * torch.rand(N, T, generator=g, dtype=torch.float64)
    old = logp_data + 0.4 * torch.randn(N, T, generator=g, dtype=torch.float64)  # ρ on both sides of the clip
    ref = logp_data + 0.3 * torch.randn(N, T, generator=g, dtype=torch.float64)
    adv = torch.randn(N, generator=g, dtype=torch.float64)

    logp = logp_data.clone().requires_grad_()
    loss, stats = grpo_loss(logp, old, ref, adv, mask, 0.2, kl_coef, estimator, agg)
    loss.backward()
    logp_ref = logp_data.clone().requires_grad_()
    expected = reference_loss(logp_ref, old, ref, adv, mask, 0.2, kl_coef, estimator, agg)
    expected.backward()

    assert_close(loss, expected)
    assert_close(logp.grad, logp_ref.grad)
    assert stats.keys() == STAT_KEYS
    assert 0 < stats["clip_frac"] < 1  # the random ratios exercise both branches
    ratio_real = torch.exp(logp_data - old)[mask]
    assert_close(stats["ratio_min"], float(ratio_real.min()))
    assert_close(stats["ratio_max"], float(ratio_real.max()))
    assert_close(stats["ratio_mean"], float(ratio_real.mean()))
    kl_real = (torch.exp(ref - logp_data) - (ref - logp_data) - 1 if estimator == "k3" else logp_data - ref)[
        mask
    ]
    assert_close(stats["kl"], float(kl_real.mean()))


@pytest.mark.parametrize("kl_coef", [0.0, 0.1])
def test_mu_one_is_the_plain_policy_gradient(kl_coef):
    # old_logp=None ⇒ ρ ≡ 1 exactly and the clip is inactive, so under seq-mean
    #   ∂loss/∂logp_it = m_it/(|o_i|·N) · (−A_i + β·∂k3/∂logp_it),  ∂k3/∂logp = 1 − exp(ref − logp)
    g = torch.Generator().manual_seed(2)
    N, T = 4, 5
    mask = torch.arange(T)[None, :] < torch.tensor([5, 2, 4, 1])[:, None]
    logp_data = -3 * torch.rand(N, T, generator=g, dtype=torch.float64)
    ref = logp_data + 0.5 * torch.randn(N, T, generator=g, dtype=torch.float64)
    adv = 10 * torch.randn(N, generator=g, dtype=torch.float64)  # big A: a live ratio would be clipped

    logp = logp_data.clone().requires_grad_()
    loss, stats = grpo_loss(logp, None, ref if kl_coef else None, adv, mask, kl_coef=kl_coef)
    loss.backward()
    assert stats["ratio_min"] == stats["ratio_max"] == stats["ratio_mean"] == 1.0
    assert stats["clip_frac"] == 0.0
    per_token = -adv[:, None] + kl_coef * (1 - torch.exp(ref - logp_data))
    expected_grad = mask * per_token / (mask.sum(dim=1, keepdim=True) * N)
    assert_close(logp.grad, expected_grad)
    # the same as passing the current log-probs as old_logp explicitly
    logp2 = logp_data.clone().requires_grad_()
    loss2, _ = grpo_loss(logp2, logp_data.clone(), ref, adv, mask, kl_coef=kl_coef)
    loss2.backward()
    assert_close(loss2, loss)
    assert_close(logp2.grad, logp.grad)


def test_kl_stat_and_penalty_hand_computed():
    # One token: π = 0.5, π_ref = 0.25, ρ = 1, A = 0 ⇒ loss = β·k3 = 0.1 · 0.193147 = 0.0193147
    logp = torch.tensor([[math.log(0.5)]], requires_grad=True)
    loss, stats = grpo_loss(
        logp, None, torch.tensor([[math.log(0.25)]]), torch.zeros(1), torch.ones(1, 1), kl_coef=0.1
    )
    assert_close(loss, torch.tensor(0.0193147))
    # stats are Python floats (compared at float64 tolerance), so give float32 slack explicitly
    assert_close(stats["kl"], 0.193147, rtol=1e-5, atol=1e-6)
    assert_close(stats["loss"], 0.0193147, rtol=1e-5, atol=1e-6)
    _, stats_k1 = grpo_loss(
        logp, None, torch.tensor([[math.log(0.25)]]), torch.zeros(1), torch.ones(1, 1), kl_estimator="k1"
    )
    assert_close(stats_k1["kl"], 0.693147, rtol=1e-5, atol=1e-6)


def test_kl_coef_zero_needs_no_reference():
    logp = torch.tensor([[-1.0, -2.0]], requires_grad=True)
    loss, stats = grpo_loss(logp, None, None, torch.tensor([2.0]), torch.ones(1, 2), kl_coef=0.0)
    assert_close(loss, torch.tensor(-2.0))  # −A·ρ averaged over the two tokens
    assert stats.keys() == STAT_KEYS and stats["kl"] == 0.0
    with pytest.raises(AssertionError, match="ref_logp is required"):
        grpo_loss(logp, None, None, torch.tensor([2.0]), torch.ones(1, 2), kl_coef=0.04)


def test_bool_and_float_masks_agree():
    g = torch.Generator().manual_seed(3)
    logp, old, ref = (-torch.rand(3, 4, generator=g) for _ in range(3))
    adv = torch.randn(3, generator=g)
    mask = torch.tensor([[1, 1, 0, 0], [1, 1, 1, 1], [1, 0, 0, 0]])
    loss_b, stats_b = grpo_loss(logp, old, ref, adv, mask.bool())
    loss_f, stats_f = grpo_loss(logp, old, ref, adv, mask.float())
    assert_close(loss_b, loss_f)
    assert stats_b == stats_f


def test_bad_arguments_fail_loudly():
    logp, adv, mask = torch.zeros(2, 3), torch.zeros(2), torch.ones(2, 3)
    with pytest.raises(ValueError, match="kl_estimator"):
        grpo_loss(logp, None, logp, adv, mask, kl_estimator="k2")
    with pytest.raises(ValueError, match="loss_agg"):
        grpo_loss(logp, None, logp, adv, mask, loss_agg="sum")
    with pytest.raises(AssertionError, match="advantages"):
        grpo_loss(logp, None, logp, torch.zeros(3), mask)
    with pytest.raises(AssertionError, match="mask"):
        grpo_loss(logp, None, logp, adv, 0.5 * mask)
