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

Variants of the objective since the paper, each a pure function below, chosen by one argument
(config: ``grpo.loss_type``, ``grpo.importance_sampling_level``, ``grpo.clip_eps_high``):

- **Decoupled clip** (DAPO's "clip-higher", arXiv 2503.14476 §3.1): clip(ρ, 1 − ε_low, 1 + ε_high)
  with ε_high > ε_low; ``clip_eps_high=None`` is the paper's symmetric clip.
- **Sequence-level ratio** (GSPO, arXiv 2507.18071): one ratio per completion, the geometric
  mean of its token ratios, clipped per sequence (``sequence_ratio``).
- **Aggregations**: ``token-mean`` (DAPO, arXiv 2503.14476 §3.3) and ``budget-mean`` (Dr. GRPO,
  arXiv 2503.20783: a constant normaliser, the generation budget, instead of 1/|o_i|).
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


def budget_mean(x_NT: Tensor, mask_NT: Tensor, budget: int) -> Tensor:
    """Dr. GRPO's constant normaliser (Liu et al., arXiv 2503.20783): Σ_it x_it / (N · L).

    L is the generation budget (``grpo.max_new_tokens``), the same for every completion, so a long
    wrong answer is not penalised less per token than a short one, as it is under 1/|o_i|. Exact
    under gradient accumulation: minibatches of n rows weighted n/N sum to it. Returns a scalar.
    """
    assert budget > 0, "budget-mean needs the generation budget L > 0 (max_completion_len)"
    assert mask_NT.shape[1] <= budget, f"completions of {mask_NT.shape[1]} tokens exceed the budget {budget}"
    return torch.where(mask_NT, x_NT, 0.0).sum() / (mask_NT.shape[0] * budget)


AGGREGATIONS = {"seq-mean": seq_mean, "token-mean": token_mean, "budget-mean": budget_mean}

# ------------------------------------------------------------------------------- the objective


def policy_ratio(logp_NT: Tensor, old_logp_NT: Tensor) -> Tensor:
    """ρ = π_θ / π_θold per token, computed in log space: exp(log π_θ − log π_θold). (N, T)."""
    return torch.exp(logp_NT - old_logp_NT)


def sequence_ratio(logp_NT: Tensor, old_logp_NT: Tensor, mask_NT: Tensor) -> Tensor:
    """GSPO's sequence-level importance ratio (Zheng et al., arXiv 2507.18071), per completion:

        s_i = (π_θ(o_i | q) / π_θold(o_i | q))^(1/|o_i|) = exp(1/|o_i| Σ_t (log π_θ(o_it) − log π_θold(o_it)))

    the geometric mean of the token ratios, so the clip acts on whole completions. Returned
    broadcast over each completion's tokens, (N, T), so that it drops into ``clipped_surrogate``
    in place of the token ratio; ``mask_NT`` is bool. With one token per completion, or on policy
    (old = θ detached: s_i = 1, ∇s_i = mean_t ∇log π_it), the GRPO objective under ``seq-mean`` is
    unchanged in value and gradient.
    """
    log_ratio_NT = torch.where(mask_NT, logp_NT - old_logp_NT, 0.0)
    log_s_N = log_ratio_NT.sum(dim=1) / mask_NT.sum(dim=1).clamp(min=1)
    return torch.exp(log_s_N)[:, None].expand_as(logp_NT)  # (N, T)


def clipped_surrogate(
    ratio_NT: Tensor, adv_N: Tensor, clip_eps: float, clip_eps_high: float | None = None
) -> Tensor:
    """PPO's pessimistic surrogate: min(ρ·A, clip(ρ, 1 − ε, 1 + ε)·A), per token.

    | argument      | symbol | shape  |
    |---------------|--------|--------|
    | ratio_NT      | ρ      | (N, T) |
    | adv_N         | A      | (N,), broadcast over the tokens of each completion |
    | clip_eps      | ε      | float (ε_low when ``clip_eps_high`` is given) |
    | clip_eps_high | ε_high | float or None (None: ε, the symmetric clip) |
    | returns       | —      | (N, T) |

    DAPO's decoupled clip (arXiv 2503.14476 §3.1) is clip(ρ, 1 − ε_low, 1 + ε_high): a larger
    ε_high lets unlikely tokens of good answers gain more probability per step ("clip-higher").
    """
    high = clip_eps if clip_eps_high is None else clip_eps_high
    adv_N1 = adv_N[:, None]
    unclipped_NT = ratio_NT * adv_N1
    clipped_NT = torch.clamp(ratio_NT, 1.0 - clip_eps, 1.0 + high) * adv_N1
    return torch.minimum(unclipped_NT, clipped_NT)


def clip_regions(
    ratio_NT: Tensor, adv_N: Tensor, clip_eps: float, clip_eps_high: float | None = None
) -> tuple[Tensor, Tensor]:
    """Where the clipped branch wins the min (and so the token's gradient is zero): (low, high), bool (N, T).

    High: ρ > 1 + ε_high with A > 0 (the policy already moved far enough up); low: ρ < 1 − ε with
    A < 0 (far enough down). Outside the range in the *other* direction the unclipped term is the
    smaller one and the gradient still flows.
    """
    high = clip_eps if clip_eps_high is None else clip_eps_high
    adv_N1 = adv_N[:, None]
    return (ratio_NT < 1.0 - clip_eps) & (adv_N1 < 0), (ratio_NT > 1.0 + high) & (adv_N1 > 0)


def clip_active(
    ratio_NT: Tensor, adv_N: Tensor, clip_eps: float, clip_eps_high: float | None = None
) -> Tensor:
    """Either clip region (``clip_regions``): the tokens whose gradient the clip stops. Bool (N, T)."""
    low_NT, high_NT = clip_regions(ratio_NT, adv_N, clip_eps, clip_eps_high)
    return low_NT | high_NT


IMPORTANCE_SAMPLING_LEVELS = ("token", "sequence")


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
    clip_eps_high: float | None = None,
    importance_sampling_level: str = "token",
    max_completion_len: int = 0,
) -> tuple[Tensor, dict[str, float]]:
    """The GRPO loss: aggregate over real tokens of −(min(ρA, clip(ρ, 1±ε)A) − β·KL).

    | argument      | symbol         | shape  | note |
    |---------------|----------------|--------|------|
    | logp          | log π_θ        | (N, T) | with gradient |
    | old_logp      | log π_θold     | (N, T) | None ⇒ μ = 1: logp.detach(), ρ ≡ 1 |
    | ref_logp      | log π_ref      | (N, T) | None allowed only when kl_coef == 0 |
    | advantages    | A              | (N,)   | from ``group_advantages`` (or a variant), flattened |
    | mask          | —              | (N, T) | bool or 0/1 float, 1 on real completion tokens |
    | clip_eps      | ε (ε_low)      | float  | |
    | kl_coef       | β              | float  | |
    | kl_estimator  | —              | str    | one of ``KL_ESTIMATORS`` |
    | loss_agg      | —              | str    | one of ``AGGREGATIONS`` |
    | clip_eps_high | ε_high         | float  | None: ε (the paper's symmetric clip) |
    | importance_sampling_level | — | str | ``token`` (ρ_it, the paper's) or ``sequence`` (GSPO's s_i) |
    | max_completion_len | L         | int    | the generation budget; used by ``budget-mean`` only |

    Returns the scalar loss and detached float stats: ``loss``, ``kl`` (token mean over real
    tokens; 0.0 when ref_logp is None), ``clip_frac`` (fraction of real tokens where the clipped
    branch is active), ``clip_frac_low`` and ``clip_frac_high`` (its two sides: TRL's
    ``clip_ratio/low_mean`` and ``clip_ratio/high_mean``), ``ratio_mean``, ``ratio_min``,
    ``ratio_max`` (over real tokens; 1.0 when the batch has no real token).
    """
    if kl_estimator not in KL_ESTIMATORS:
        raise ValueError(f"unknown kl_estimator {kl_estimator!r}; expected one of {sorted(KL_ESTIMATORS)}")
    if loss_agg not in AGGREGATIONS:
        raise ValueError(f"unknown loss_agg {loss_agg!r}; expected one of {sorted(AGGREGATIONS)}")
    if importance_sampling_level not in IMPORTANCE_SAMPLING_LEVELS:
        raise ValueError(f"unknown importance_sampling_level {importance_sampling_level!r}; "
                         f"expected one of {IMPORTANCE_SAMPLING_LEVELS}")  # fmt: skip
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

    # The next two lines are the clipped policy-gradient term of the GRPO objective (GSPO takes
    # one ratio per completion instead of one per token).
    ratio_NT = (policy_ratio(logp_NT, old_logp_NT.detach()) if importance_sampling_level == "token"
                else sequence_ratio(logp_NT, old_logp_NT.detach(), mask_NT))  # fmt: skip
    surrogate_NT = clipped_surrogate(ratio_NT, adv_N, clip_eps, clip_eps_high)

    # The KL penalty; β = 0 skips it entirely (the caller then needs no reference forward).
    kl_NT = None
    if ref_logp is not None:
        ref_logp_NT = torch.where(mask_NT, ref_logp, logp_NT.detach()).detach()
        kl_NT = KL_ESTIMATORS[kl_estimator](logp_NT, ref_logp_NT)
    per_token_loss_NT = -(surrogate_NT - kl_coef * kl_NT) if kl_coef != 0 else -surrogate_NT

    if loss_agg == "budget-mean":  # Dr. GRPO: the one aggregation that needs a number besides the mask
        loss = budget_mean(per_token_loss_NT, mask_NT, max_completion_len)
    else:
        loss = AGGREGATIONS[loss_agg](per_token_loss_NT, mask_NT)

    with torch.no_grad():
        n_tokens = int(mask_NT.sum())
        ratio_real = ratio_NT[mask_NT]
        low_NT, high_NT = clip_regions(ratio_NT, adv_N, clip_eps, clip_eps_high)
        stats = {
            "loss": float(loss),
            "kl": float(token_mean(kl_NT, mask_NT)) if kl_NT is not None else 0.0,
            "clip_frac": float(token_mean((low_NT | high_NT).to(logp.dtype), mask_NT)),
            "clip_frac_low": float(token_mean(low_NT.to(logp.dtype), mask_NT)),
            "clip_frac_high": float(token_mean(high_NT.to(logp.dtype), mask_NT)),
            "ratio_mean": float(ratio_real.mean()) if n_tokens else 1.0,
            "ratio_min": float(ratio_real.min()) if n_tokens else 1.0,
            "ratio_max": float(ratio_real.max()) if n_tokens else 1.0,
        }
    return loss, stats
