"""The GRPO objective (arXiv 2402.03300 eq. 3, as arXiv 2503.19948 trains with it), written term by term.

For completion i of a group and its token t, with ρ_it = π_θ(o_it | q, o_i<t) / π_θold(o_it | …):

    surrogate_it = min(ρ_it · A_i, clip(ρ_it, 1 − ε, 1 + ε) · A_i)
    loss_it      = −(surrogate_it − β · KL_it)
    loss         = aggregate(loss_it over real completion tokens)

Shape key: ``N = B·G`` completions, ``T`` completion tokens (right-padded; ``mask_NT`` is 1 on
real tokens). All log-probabilities are per token, ``log π(o_it | …)``, shape (N, T).

Deviations from the paper, on purpose (all of them: docs/math.md):

- **KL estimator.** The paper writes the KL term as the log ratio log(π_θ/π_ref) (``k1``). By
  default we use Schulman's ``k3`` = π_ref/π_θ − log(π_ref/π_θ) − 1, which is unbiased for
  KL(π_θ‖π_ref) under samples from π_θ, always ≥ 0 and has lower variance
  (http://joschu.net/blog/kl-approx.html); the DeepSeekMath GRPO paper uses k3 too.
  ``kl_estimator="k1"`` restores the literal term, for comparison only: **as a loss term on
  samples from π_θ, k1 regularises nothing.** Its gradient is ∇log π_θ(o), whose expectation
  under o ~ π_θ is zero (the score-function identity), so β·k1 adds noise and no pull towards
  π_ref. (k1 does regularise when it is subtracted from the *reward*, as in PPO-style RLHF; GRPO
  puts the KL in the loss, where k3's gradient is the one that points back to π_ref.)
- **Advantage std.** The unbiased group std (divisor G − 1) lives in ``grpo.advantages``; this
  module takes the advantages as given.
- **Aggregation.** ``seq-mean`` (the paper's 1/G Σ_i 1/|o_i| Σ_t) is the default;
  ``token-mean`` (one mean over all real tokens of the batch, as in DAPO) is an option.
  A completion with zero real tokens contributes 0 under ``seq-mean`` and still counts in the
  mean over completions (as TRL does), so it never produces NaN.
- **μ = 1.** With ``old_logp=None`` the old policy is the current one detached: ρ = 1 exactly,
  the clip is inactive, and the gradient is the plain policy gradient −A·∇log π (+ β·∇KL).
"""

from __future__ import annotations

import torch
from torch import Tensor

# --------------------------------------------------------------------------------- KL estimators


def kl_k3(logp_NT: Tensor, ref_logp_NT: Tensor) -> Tensor:
    """Schulman's k3 estimator of KL(π_θ ‖ π_ref), per token.

        k3 = exp(log π_ref − log π_θ) − (log π_ref − log π_θ) − 1        ≥ 0

    http://joschu.net/blog/kl-approx.html. Shapes: (N, T) → (N, T).
    """
    log_ratio_NT = ref_logp_NT - logp_NT
    return torch.exp(log_ratio_NT) - log_ratio_NT - 1.0


def kl_k1(logp_NT: Tensor, ref_logp_NT: Tensor) -> Tensor:
    """The naive estimator, the paper's literal term: k1 = log π_θ − log π_ref (can be < 0).

    An unbiased estimate of KL(π_θ ‖ π_ref), but as a loss term on-policy its expected gradient is
    zero (see the module docstring): it measures the KL, it does not restrain it.

    Shapes: (N, T) → (N, T).
    """
    return logp_NT - ref_logp_NT


KL_ESTIMATORS = {"k3": kl_k3, "k1": kl_k1}

# ------------------------------------------------------------------------------- aggregations


def seq_mean(x_NT: Tensor, mask_NT: Tensor) -> Tensor:
    """Mean over each completion's own tokens, then over completions: 1/N Σ_i 1/|o_i| Σ_t x_it.

    ``mask_NT`` is bool. A completion with |o_i| = 0 contributes 0 (its divisor is clamped to 1).
    Returns a scalar.
    """
    sum_N = torch.where(mask_NT, x_NT, 0.0).sum(dim=1)
    len_N = mask_NT.sum(dim=1).clamp(min=1)
    return (sum_N / len_N).mean()


def token_mean(x_NT: Tensor, mask_NT: Tensor) -> Tensor:
    """One mean over every real token of the batch: Σ_it x_it / Σ_i |o_i| (0 if there are none).

    ``mask_NT`` is bool. Returns a scalar.
    """
    return torch.where(mask_NT, x_NT, 0.0).sum() / mask_NT.sum().clamp(min=1)


AGGREGATIONS = {"seq-mean": seq_mean, "token-mean": token_mean}

# ------------------------------------------------------------------------------- the objective


def policy_ratio(logp_NT: Tensor, old_logp_NT: Tensor) -> Tensor:
    """ρ = π_θ / π_θold per token, computed in log space: exp(log π_θ − log π_θold). (N, T)."""
    return torch.exp(logp_NT - old_logp_NT)


def clipped_surrogate(ratio_NT: Tensor, adv_N: Tensor, clip_eps: float) -> Tensor:
    """PPO's pessimistic surrogate: min(ρ·A, clip(ρ, 1 − ε, 1 + ε)·A), per token.

    | argument  | symbol | shape  |
    |-----------|--------|--------|
    | ratio_NT  | ρ      | (N, T) |
    | adv_N     | A      | (N,), broadcast over the tokens of each completion |
    | clip_eps  | ε      | float  |
    | returns   | —      | (N, T) |
    """
    adv_N1 = adv_N[:, None]
    unclipped_NT = ratio_NT * adv_N1
    clipped_NT = torch.clamp(ratio_NT, 1.0 - clip_eps, 1.0 + clip_eps) * adv_N1
    return torch.minimum(unclipped_NT, clipped_NT)


def clip_active(ratio_NT: Tensor, adv_N: Tensor, clip_eps: float) -> Tensor:
    """Where the clipped branch wins the min (and so the token's gradient is zero). Bool (N, T).

    That is ρ > 1 + ε with A > 0 (the policy already moved far enough up) or ρ < 1 − ε with
    A < 0 (far enough down). Outside the range in the *other* direction the unclipped term is the
    smaller one and the gradient still flows.
    """
    adv_N1 = adv_N[:, None]
    return ((ratio_NT > 1.0 + clip_eps) & (adv_N1 > 0)) | ((ratio_NT < 1.0 - clip_eps) & (adv_N1 < 0))


def grpo_loss(
    logp: Tensor,
    old_logp: Tensor | None,
    ref_logp: Tensor | None,
    advantages: Tensor,
    mask: Tensor,
    clip_eps: float = 0.2,
    kl_coef: float = 0.04,
    kl_estimator: str = "k3",
    loss_agg: str = "seq-mean",
) -> tuple[Tensor, dict[str, float]]:
    """The GRPO loss: aggregate over real tokens of −(min(ρA, clip(ρ, 1±ε)A) − β·KL).

    | argument     | symbol         | shape  | note |
    |--------------|----------------|--------|------|
    | logp         | log π_θ        | (N, T) | with gradient |
    | old_logp     | log π_θold     | (N, T) | None ⇒ μ = 1: logp.detach(), ρ ≡ 1 |
    | ref_logp     | log π_ref      | (N, T) | None allowed only when kl_coef == 0 |
    | advantages   | A              | (N,)   | from ``group_advantages``, flattened |
    | mask         | —              | (N, T) | bool or 0/1 float, 1 on real completion tokens |
    | clip_eps     | ε              | float  | |
    | kl_coef      | β              | float  | |
    | kl_estimator | —              | str    | one of ``KL_ESTIMATORS`` |
    | loss_agg     | —              | str    | one of ``AGGREGATIONS`` |

    Returns the scalar loss and detached float stats: ``loss``, ``kl`` (token mean over real
    tokens; 0.0 when ref_logp is None), ``clip_frac`` (fraction of real tokens where the clipped
    branch is active) and its sides ``clip_frac_low`` (ρ < 1 − ε, A < 0) and ``clip_frac_high``
    (ρ > 1 + ε, A > 0), ``ratio_mean``, ``ratio_min``, ``ratio_max`` (over real tokens; 1.0 when
    the batch has no real token).
    """
    if kl_estimator not in KL_ESTIMATORS:
        raise ValueError(f"unknown kl_estimator {kl_estimator!r}; expected one of {sorted(KL_ESTIMATORS)}")
    if loss_agg not in AGGREGATIONS:
        raise ValueError(f"unknown loss_agg {loss_agg!r}; expected one of {sorted(AGGREGATIONS)}")
    assert logp.dim() == 2, f"logp must be (N, T), got shape {tuple(logp.shape)}"
    N, T = logp.shape
    assert mask.shape == (N, T), f"mask {tuple(mask.shape)} does not match logp {(N, T)}"
    assert advantages.shape == (N,), f"advantages must be (N,) = ({N},), got {tuple(advantages.shape)}"
    assert ((mask == 0) | (mask == 1)).all(), "mask must hold only 0 and 1"
    assert ref_logp is not None or kl_coef == 0, "ref_logp is required when kl_coef != 0"
    for name, other in (("old_logp", old_logp), ("ref_logp", ref_logp)):
        assert other is None or other.shape == (N, T), f"{name} {tuple(other.shape)} != logp {(N, T)}"
    mask_NT = mask.bool()
    adv_N = advantages.detach().to(logp.dtype)
    logp_NT = logp

    # Padding positions may hold arbitrary log-probs; make them agree with logp there so that
    # exp() cannot overflow and no NaN gradient can leak through the masked-out tokens.
    old_logp_NT = logp_NT.detach() if old_logp is None else torch.where(mask_NT, old_logp, logp_NT.detach())

    # The next two lines are the clipped policy-gradient term of the GRPO objective.
    ratio_NT = policy_ratio(logp_NT, old_logp_NT.detach())
    surrogate_NT = clipped_surrogate(ratio_NT, adv_N, clip_eps)

    # The KL penalty; β = 0 skips it entirely (the caller then needs no reference forward).
    kl_NT = None
    if ref_logp is not None:
        ref_logp_NT = torch.where(mask_NT, ref_logp, logp_NT.detach()).detach()
        kl_NT = KL_ESTIMATORS[kl_estimator](logp_NT, ref_logp_NT)
    per_token_loss_NT = -(surrogate_NT - kl_coef * kl_NT) if kl_coef != 0 else -surrogate_NT

    loss = AGGREGATIONS[loss_agg](per_token_loss_NT, mask_NT)

    with torch.no_grad():
        n_tokens = int(mask_NT.sum())
        ratio_real = ratio_NT[mask_NT]
        stats = {
            "loss": float(loss),
            "kl": float(token_mean(kl_NT, mask_NT)) if kl_NT is not None else 0.0,
            "clip_frac": float(token_mean(clip_active(ratio_NT, adv_N, clip_eps).to(logp.dtype), mask_NT)),
            # its two sides, TRL's clip_ratio/low_mean and clip_ratio/high_mean (clip_frac = low + high)
            "clip_frac_low": float(
                token_mean(((ratio_NT < 1 - clip_eps) & (adv_N[:, None] < 0)).float(), mask_NT)
            ),
            "clip_frac_high": float(
                token_mean(((ratio_NT > 1 + clip_eps) & (adv_N[:, None] > 0)).float(), mask_NT)
            ),
            "ratio_mean": float(ratio_real.mean()) if n_tokens else 1.0,
            "ratio_min": float(ratio_real.min()) if n_tokens else 1.0,
            "ratio_max": float(ratio_real.max()) if n_tokens else 1.0,
        }
    return loss, stats
