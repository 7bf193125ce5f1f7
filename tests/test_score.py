"""Scoring (eval/score.py, eval/pairwise.py): anchor vs pairwise calls, Mean@k, determinism, Bradley–Terry."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from conftest import solid

from eval.evaluate import METHODS as CLI_METHODS
from eval.pairwise import (
    anchor_comparisons,
    anchor_scores,
    bradley_terry,
    choose_anchor,
    preference_matrix,
    round_robin_comparisons,
    round_robin_scores,
)
from eval.score import (
    METHODS,
    Request,
    ScoringSpec,
    encode_requests,
    hard_scores,
    score_completions,
    score_groups,
    seeded,
)
from models.qwen_vl import repeat_inputs

SCALE = (1, 2, 3, 4, 5, 6, 7)
PROMPT = "a red circle on a white background"


pytestmark = pytest.mark.usefixtures("one_thread")


def _images():
    # Different sizes, so the packed pixel_values of a batch must be sliced per row correctly.
    return [solid("red"), solid("blue", 100), solid("green", 56), solid("yellow", 84)]


def _rescore_one(model, processor, task, images, judgement, values, prompt=PROMPT):
    """Slow reference: the request alone in its own batch, scoring the same k completions."""
    inputs = encode_requests(processor, [Request(task, prompt, images)], SCALE if task == "rating" else ())
    k = len(judgement.texts)
    return score_completions(model, processor, repeat_inputs(inputs, k), judgement.ids_kT, judgement.mask_kT,
                             judgement.texts, task, values)  # fmt: skip


# ------------------------------------------------------------------ pure pairwise arithmetic


def test_hard_scores_by_hand():
    texts = ["<think>ok</think><answer>5</answer>", "no tags 5", "<think>x</think><answer>9</answer>"]
    # 5 is valid; a malformed answer and an out-of-scale 9 both get min(scale) − 1 = 0.
    assert hard_scores(texts, "rating", SCALE) == ([5.0, 0.0, 0.0], [True, False, False])
    # Pair: a malformed answer is "no preference", 0.5.
    assert hard_scores(["<think>a</think><answer>1</answer>", "1"], "pair", (0, 1)) == (
        [1.0, 0.5],
        [True, False],
    )


def test_anchor_draw_is_seeded_by_seed_and_group():
    draws = [choose_anchor(9, 0, f"g{i}") for i in range(40)]
    assert draws == [choose_anchor(9, 0, f"g{i}") for i in range(40)]  # same seed, same group → same anchor
    assert all(0 <= a < 9 for a in draws) and len(set(draws)) > 3  # spread over the images
    assert draws != [choose_anchor(9, 1, f"g{i}") for i in range(40)]  # another seed, other anchors


def test_plans():
    assert anchor_comparisons(4, 2) == [(2, 0), (2, 1), (2, 3)]
    assert anchor_comparisons(3, 0, debias=True) == [(0, 1), (1, 0), (0, 2), (2, 0)]
    assert round_robin_comparisons(3) == [(0, 1), (0, 2), (1, 2)]
    assert len(round_robin_comparisons(9, debias=True)) == 72


def test_position_debiasing_averages_the_two_orders():
    # [anchor 0, image 1]: p(second better) = 0.8 → P(1 ≻ 0) = 0.8
    # [image 1, anchor 0]: p(second better) = 0.4 → P(1 ≻ 0) = 1 − 0.4 = 0.6
    # debiased: (0.8 + 0.6) / 2 = 0.7; the anchor itself 0.5.
    comparisons = anchor_comparisons(2, 0, debias=True)
    assert anchor_scores(2, 0, comparisons, [0.8, 0.4]) == pytest.approx([0.5, 0.7])
    P, n = preference_matrix(2, comparisons, [0.8, 0.4])
    np.testing.assert_allclose(P, [[0.5, 0.3], [0.7, 0.5]])
    np.testing.assert_allclose(n, [[0, 2], [2, 0]])
    assert anchor_scores(2, 0, [(0, 1)], [0.8]) == pytest.approx([0.5, 0.8])  # one order: p itself


def test_round_robin_bradley_terry_recovers_hand_built_strengths():
    # Exact BT preferences P(i ≻ j) = σ(s_i − s_j): the MLE (λ = 0) is s itself, up to its mean.
    s = np.array([2.0, 0.5, -1.0, 0.0, 1.0])
    comparisons = round_robin_comparisons(5)
    p_second = [1 / (1 + math.exp(s[i] - s[j])) for i, j in comparisons]  # P(j ≻ i)
    scores = np.array(round_robin_scores(5, comparisons, p_second, prior=0.0))
    np.testing.assert_allclose(scores, s - s.mean(), atol=1e-6)
    # With the default prior the strengths shrink towards 0 but keep the order.
    shrunk = round_robin_scores(5, comparisons, p_second)
    assert list(np.argsort(shrunk)) == list(np.argsort(s))
    assert np.all(np.abs(shrunk) <= np.abs(s - s.mean()) + 1e-9)


def test_bradley_terry_on_hard_wins_of_a_total_order():
    # Hard answers from the order 2 ≻ 0 ≻ 3 ≻ 1: every comparison 0/1; the plain MLE diverges,
    # the prior keeps it finite and the order is recovered.
    order = [2, 0, 3, 1]
    better = {(a, b) for x, a in enumerate(order) for b in order[x + 1 :]}
    comparisons = round_robin_comparisons(4, debias=True)
    p_second = [1.0 if (j, i) in better else 0.0 for i, j in comparisons]
    scores = round_robin_scores(4, comparisons, p_second)
    assert all(map(math.isfinite, scores))
    assert sorted(range(4), key=lambda i: -scores[i]) == order
    with pytest.raises(ValueError, match="without any win"):
        P, n = preference_matrix(4, comparisons, p_second)
        bradley_terry(P, n, prior=0.0)


def test_spec_validation():
    with pytest.raises(ValueError, match="rating scale"):
        ScoringSpec("rating")
    with pytest.raises(ValueError, match="debias"):
        ScoringSpec("rating", SCALE, debias=True)
    with pytest.raises(ValueError, match="unknown scoring method"):
        ScoringSpec("bradley")
    assert ScoringSpec("anchor", k=3).ks == (1, 3) and ScoringSpec("anchor").values == (0, 1)
    assert CLI_METHODS == METHODS  # the CLI's copy, kept free of heavy imports


# ----------------------------------------------------------------------- with the tiny model


def test_anchor_scoring_equals_n_minus_1_separate_pairwise_calls(tiny):
    """Fast path (all N−1 comparisons in one batched generate + one scoring pass) vs the slow
    reference (each comparison [anchor, j] alone, scoring the same completions)."""
    model, processor = tiny
    images = _images()
    spec = ScoringSpec("anchor", k=2, max_new_tokens=10, batch_size=8, seed=3)
    with seeded(0):
        (result,) = score_groups(model, processor, [("g", PROMPT, images)], spec)
    a = result.anchor
    assert a == choose_anchor(4, 3, "g")
    assert result.requests == [(a, j) for j in range(4) if j != a]  # images in order [anchor, other]
    for (first, second), judgement in zip(result.requests, result.judgements):
        soft, hard, ok, fb, choice = _rescore_one(model, processor, "pair", [images[first], images[second]],
                                                  judgement, (0, 1))  # fmt: skip
        assert judgement.choice == choice == [float(p > 0.5) for p in soft], "the argmax of (p(0), p(1))"
        torch.testing.assert_close(torch.tensor(judgement.soft), torch.tensor(soft), atol=1e-5, rtol=0)
        assert (judgement.hard, judgement.well_formed, judgement.fallback) == (hard, ok, fb)
        # p(1 | C) = p(the second, non-anchor image is better) is that image's score.
        assert result.scores["soft@2"][second] == pytest.approx(sum(soft) / 2, abs=1e-5)
        assert result.scores["soft@1"][second] == pytest.approx(soft[0], abs=1e-5)
    assert result.scores["soft@2"][a] == result.scores["hard@2"][a] == 0.5
    assert all(0.0 <= p <= 1.0 for p in result.scores["soft@2"])


def test_batches_mix_prompts_and_results_come_back_in_order(tiny):
    model, processor = tiny
    groups = [("g0", "a red circle", _images()[:3]), ("g1", "a blue square", _images()[1:]),
              ("g2", "a green triangle", _images()[:2])]  # fmt: skip
    spec = ScoringSpec("rating", SCALE, k=1, max_new_tokens=8, batch_size=4)  # 8 requests: batches 4 + 4
    with seeded(0):
        results = list(score_groups(model, processor, groups, spec))
    assert [r.group_id for r in results] == ["g0", "g1", "g2"]
    assert [len(r.scores["soft@1"]) for r in results] == [3, 3, 2]
    # Group g1's middle image was rated in a batch shared with g0 and g2: rescoring it alone agrees.
    j = results[1].judgements[1]
    soft, *_ = _rescore_one(model, processor, "rating", [groups[1][2][1]], j, SCALE, groups[1][1])
    assert results[1].scores["soft@1"][1] == pytest.approx(soft[0], abs=1e-5)
    assert all(1.0 <= s <= 7.0 for r in results for s in r.scores["soft@1"])


def test_mean_at_k_is_the_mean_of_single_rollout_scores(tiny):
    model, processor = tiny
    images = _images()[:3]
    with seeded(0):
        (r3,) = score_groups(model, processor, [("g", PROMPT, images)], ScoringSpec("rating", SCALE, k=3,
                             max_new_tokens=8))  # fmt: skip
    assert set(r3.scores) == {"soft@1", "hard@1", "soft@3", "hard@3"}
    for i, j in enumerate(r3.judgements):
        assert len(j.texts) == 3
        assert r3.scores["soft@3"][i] == pytest.approx(sum(j.soft) / 3)
        assert r3.scores["hard@3"][i] == pytest.approx(sum(j.hard) / 3)
        assert r3.scores["soft@1"][i] == j.soft[0]  # Mean@1 from the first rollout
    # k = 1: Mean@1 is exactly the single soft score of the one completion, scored on its own.
    with seeded(0):
        (r1,) = score_groups(model, processor, [("g", PROMPT, images)], ScoringSpec("rating", SCALE, k=1,
                             max_new_tokens=8))  # fmt: skip
    assert set(r1.scores) == {"soft@1", "hard@1"}
    for i, j in enumerate(r1.judgements):
        soft, hard, *_ = _rescore_one(model, processor, "rating", [images[i]], j, SCALE)
        assert r1.scores["soft@1"][i] == pytest.approx(soft[0], abs=1e-5)
        assert r1.scores["hard@1"][i] == hard[0]


def test_scores_are_deterministic_under_a_fixed_seed_and_leave_the_rng_alone(tiny):
    model, processor = tiny
    spec = ScoringSpec("anchor", k=2, max_new_tokens=8, debias=True)

    def run(seed):
        with seeded(seed):
            (r,) = score_groups(model, processor, [("g", PROMPT, _images()[:3])], spec)
        return r

    torch.manual_seed(123)
    state = torch.get_rng_state()
    a, b, c = run(0), run(0), run(1)
    assert torch.equal(torch.get_rng_state(), state)  # the caller's stream is untouched
    assert a.scores == b.scores and [j.texts for j in a.judgements] == [j.texts for j in b.judgements]
    assert [j.texts for j in a.judgements] != [j.texts for j in c.judgements]
    # Debiasing: each image j ≠ anchor is asked as [anchor, j] and [j, anchor]; its score averages
    # p(j ≻ anchor) from both: ½ (p(1 | C_{a,j}) + 1 − p(1 | C_{j,a})).
    assert len(a.requests) == 4
    for j in range(3):
        if j != a.anchor:
            fwd = a.judgements[a.requests.index((a.anchor, j))].mean("soft", 2)
            rev = a.judgements[a.requests.index((j, a.anchor))].mean("soft", 2)
            assert a.scores["soft@2"][j] == pytest.approx((fwd + 1 - rev) / 2)
