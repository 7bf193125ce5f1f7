"""``draw_tokens``: one token per row by inverse CDF, from the distribution ``generate`` samples.

Our sampling loop draws with it; the loop itself is held to ``generate`` token for token with
``draw_tokens_as_generate`` (``test_prefix_sharing``, ``test_real_config``). Here: the draw follows
``softmax(scores)``, never returns a token of weight 0 (−∞, the suppressed vision tokens), and
holds at the real vocabulary. Frequencies are checked to 5 standard errors with a fixed seed.
"""

from __future__ import annotations

import torch

from models.sampling import draw_tokens, draw_tokens_as_generate

V_REAL = 152_064
VISION = torch.arange(151_652, 151_657)  # Qwen2.5-VL's suppressed vision tokens


def assert_frequencies(drawn: torch.Tensor, probs: torch.Tensor, what: str) -> None:
    """Each category's share of ``drawn`` is its probability to 5 standard errors."""
    n = drawn.numel()
    freq = torch.bincount(drawn, minlength=probs.numel()).double() / n
    se = (probs * (1 - probs) / n).sqrt()
    bad = (freq - probs).abs() > 5 * se + 1e-12
    assert not bad.any(), f"{what}: drawn {freq[bad].tolist()}, expected {probs[bad].tolist()}"


def test_frequencies_follow_the_softmax_and_weight_zero_is_never_drawn():
    probs = torch.tensor([0.5, 0.0, 0.2, 0.0, 0.25, 0.05, 0.0], dtype=torch.float64)
    scores = (probs.log() + 3.0).float()  # any shift: the softmax is what counts
    torch.manual_seed(0)
    drawn = draw_tokens(scores.repeat(400_000, 1))
    assert_frequencies(drawn, probs, "small vocabulary")
    assert not torch.isin(drawn, torch.tensor([1, 3, 6])).any(), "a token of probability 0 was drawn"


def test_same_distribution_as_generates_draw():
    torch.manual_seed(1)
    scores = torch.randn(12) * 2
    scores[[0, 11]] = -torch.inf  # first and last token suppressed
    ours = draw_tokens(scores.repeat(200_000, 1))
    theirs = draw_tokens_as_generate(scores.repeat(200_000, 1))
    probs = torch.softmax(scores.double(), dim=0)
    assert_frequencies(ours, probs, "draw_tokens")
    assert_frequencies(theirs, probs, "draw_tokens_as_generate")
    assert not torch.isin(ours, torch.tensor([0, 11])).any()


def test_at_the_real_vocabulary():
    """V = 152,064: one token holds half the mass and 152,050 tokens of equal weight the other
    half, so the running sum adds 10^5 small terms to a large one; the vision tokens and the last
    nine tokens are suppressed, so the top of the CDF is flat."""
    scores = torch.zeros(V_REAL)
    scores[VISION] = -torch.inf
    scores[-9:] = -torch.inf
    heavy = 70_000
    weights = torch.isfinite(scores).double()
    weights[heavy] = weights.sum() - 1  # half the mass
    scores[heavy] = float(torch.log(weights[heavy]))
    probs = weights / weights.sum()
    torch.manual_seed(2)
    drawn = torch.cat([draw_tokens(scores.repeat(500, 1)) for _ in range(8)])  # 4,000 draws
    assert not torch.isin(drawn, torch.cat([VISION, torch.arange(V_REAL - 9, V_REAL)])).any()
    # the heavy token, and the light tokens in 8 bins of the vocabulary
    bins = torch.div(torch.arange(V_REAL), V_REAL // 8 + 1, rounding_mode="floor")
    bins[heavy] = 8
    bin_probs = torch.zeros(9, dtype=torch.float64).index_add_(0, bins, probs)
    assert_frequencies(bins[drawn], bin_probs, "real vocabulary")


def test_scores_are_overwritten_not_reallocated():
    """The loop hands each step's logits to the draw, which reuses them as its one (N, V) buffer."""
    scores = torch.randn(4, 1000)
    before = scores.data_ptr()
    draw_tokens(scores)
    assert scores.data_ptr() == before and torch.all(scores[:, 1:] >= scores[:, :-1]), "holds the CDF"
