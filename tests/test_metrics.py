"""Official metric protocols on the real ImageReward test labels and on hand-built cases (docs/data-and-metrics.md)."""

import json
import random

import pytest
import torch
from conftest import shared_fixture
from torch.testing import assert_close

from eval.metrics import count_pairs, hpsv2_accuracy, imagereward_accuracy, model_rank, pairwise_accuracy


@pytest.fixture(scope="module")
def rankings():
    """The real labels of THUDM/ImageReward data/test.json (no images), from the shared fixtures."""
    rows = json.loads(shared_fixture("imagereward_test.json").read_text())
    assert len(rows) == 466
    return [row["ranking"] for row in rows]


def test_fixture_pair_counts(rankings):
    # published: 7,230 pairs, of which 831 are human ties (6,399 without ties)
    assert count_pairs(rankings) == {"pairs": 7230, "human_ties": 831}
    assert sum(len(r) for r in rankings) == 2720


def test_constant_scores(rankings):
    constant = [[0.0] * len(r) for r in rankings]
    assert imagereward_accuracy(rankings, constant) == 0.0  # every pair is a model tie → wrong
    assert pairwise_accuracy(rankings, constant) == 0.5  # every model tie is half right


def test_negated_human_rank_is_perfect(rankings):
    perfect = [[-r for r in rank] for rank in rankings]
    assert imagereward_accuracy(rankings, perfect) == 1.0
    assert hpsv2_accuracy(rankings, perfect) == 1.0
    assert pairwise_accuracy(rankings, perfect) == 1.0


def test_random_scores_are_chance(rankings):
    rng = random.Random(0)
    scores = [[rng.random() for _ in rank] for rank in rankings]
    # published: about 0.506 for random scores (6,399 pairs → binomial std ≈ 0.006)
    assert abs(imagereward_accuracy(rankings, scores) - 0.506) < 0.02
    # HPSv2 counts the 831/7230 = 11.5% human ties as right: ≈ 0.5 · 0.885 + 0.115 ≈ 0.56
    assert abs(hpsv2_accuracy(rankings, scores) - 0.56) < 0.03


def hpsv2_torch_reference(rankings, scores):
    """HPSv2's own construction: rank = index of j in argsort(−s), then count inversions (vectorised)."""
    per_prompt = []
    for rank, score in zip(rankings, scores):
        h = torch.tensor(rank, dtype=torch.float64)
        order = torch.argsort(-torch.tensor(score, dtype=torch.float64), stable=True)
        m = torch.argsort(order)  # m[j] = position of image j in the model's order
        dh, dm = h[:, None] - h[None, :], (m[:, None] - m[None, :]).double()  # (n, n)
        discordant = int(torch.triu((dh * dm) < 0, diagonal=1).sum())
        n = len(rank)
        per_prompt.append(1 - discordant / (n * (n - 1) / 2))
    return sum(per_prompt) / len(per_prompt)


def imagereward_torch_reference(rankings, scores):
    """Pooled pair accuracy (vectorised): right iff (h_i − h_j)(s_i − s_j) < 0; human ties skipped."""
    right = total = 0
    for rank, score in zip(rankings, scores):
        h, s = torch.tensor(rank, dtype=torch.float64), torch.tensor(score, dtype=torch.float64)
        upper = torch.triu(torch.ones(len(rank), len(rank), dtype=torch.bool), diagonal=1)
        dh, ds = h[:, None] - h[None, :], s[:, None] - s[None, :]  # (n, n)
        total += int((upper & (dh != 0)).sum())
        right += int((upper & (dh * ds < 0)).sum())
    return right / total


def test_against_vectorised_references_with_many_ties(rankings):
    # hard (sampled-digit) scores tie often: the tie rules of each protocol decide these numbers
    rng = random.Random(1)
    hard = [[rng.randint(1, 4) for _ in rank] for rank in rankings]
    assert_close(imagereward_accuracy(rankings, hard), imagereward_torch_reference(rankings, hard))
    assert_close(hpsv2_accuracy(rankings, hard), hpsv2_torch_reference(rankings, hard))


def test_model_rank_breaks_ties_by_index():
    # scores (0.2, 0.5, 0.5, 0.1): best-first order is 1, 2 (tie: index order), 0, 3
    assert model_rank([0.2, 0.5, 0.5, 0.1]) == [2, 0, 1, 3]
    assert model_rank([0.0, 0.0, 0.0]) == [0, 1, 2]


# Three hand-built prompts (human rank: lower = better; score: higher = better).
#   A: ranks (1, 2, 2, 3), scores (.9, .5, .5, .1): pair (1,2) is a human tie; the other 5 pairs are right.
#   B: ranks (1, 2, 3),    scores (.5, .5, .1):     pair (0,1) is a model tie, index order agrees with humans.
#   C: ranks (2, 1, 3),    scores (.5, .5, .1):     pair (0,1) is a model tie, index order disagrees.
HAND_RANKS = [[1, 2, 2, 3], [1, 2, 3], [2, 1, 3]]
HAND_SCORES = [[0.9, 0.5, 0.5, 0.1], [0.5, 0.5, 0.1], [0.5, 0.5, 0.1]]


def test_hand_built_imagereward():
    # A: 5/5 (tie skipped); B: 2/3 (model tie wrong); C: 2/3. Pooled: (5 + 2 + 2)/(5 + 3 + 3) = 9/11
    assert imagereward_accuracy(HAND_RANKS[:1], HAND_SCORES[:1]) == 1.0
    assert_close(imagereward_accuracy(HAND_RANKS[1:2], HAND_SCORES[1:2]), 2 / 3)
    assert_close(imagereward_accuracy(HAND_RANKS, HAND_SCORES), 9 / 11)


def test_hand_built_hpsv2():
    # A: model rank (0,1,2,3); human tie (1,2) is not discordant → 1 − 0/6 = 1
    # B: model tie broken by index → model rank (0,1,2) agrees with humans → 1 − 0/3 = 1
    # C: model rank (0,1,2) but humans prefer image 1 over 0 → 1 discordant → 1 − 1/3 = 2/3
    # mean over prompts: (1 + 1 + 2/3)/3 = 8/9
    assert_close(hpsv2_accuracy(HAND_RANKS, HAND_SCORES), 8 / 9)
    # a human tie counts as right even when the model strictly prefers one image
    assert hpsv2_accuracy([[1, 1]], [[0.0, 1.0]]) == 1.0


def test_hand_built_pairwise():
    # A: 5/5; B and C: 2 right + ½ for the model tie. Pooled: (5 + 2.5 + 2.5)/11 = 10/11
    assert_close(pairwise_accuracy(HAND_RANKS, HAND_SCORES), 10 / 11)


def test_pooled_versus_per_prompt_averaging():
    # prompt 1: 4 images all ordered right (6 pairs); prompt 2: 2 images ordered wrong (1 pair)
    # ImageReward pools pairs: 6/7.  HPSv2 averages prompts: (1 + 0)/2 = 0.5
    ranks, scores = [[1, 2, 3, 4], [1, 2]], [[4.0, 3.0, 2.0, 1.0], [0.0, 1.0]]
    assert_close(imagereward_accuracy(ranks, scores), 6 / 7)
    assert_close(hpsv2_accuracy(ranks, scores), 0.5)


def test_count_pairs_hand_built():
    # A: 6 pairs, 1 tie; B: 3, 0; C: 3, 0; [1, 1, 1]: 3 pairs, all 3 ties
    assert count_pairs(HAND_RANKS + [[1, 1, 1]]) == {"pairs": 15, "human_ties": 4}


def test_bad_input_fails_loudly():
    with pytest.raises(ValueError, match="prompts"):
        imagereward_accuracy([[1, 2]], [[0.1, 0.2], [0.3, 0.4]])
    with pytest.raises(ValueError, match="prompt 0: 2 human ranks but 3 scores"):
        hpsv2_accuracy([[1, 2]], [[0.1, 0.2, 0.3]])
    with pytest.raises(ValueError, match="at least 2"):
        hpsv2_accuracy([[1]], [[0.5]])
    with pytest.raises(ValueError, match="non-finite"):
        imagereward_accuracy([[1, 2]], [[float("nan"), 0.2]])
    with pytest.raises(ValueError, match="human tie"):
        imagereward_accuracy([[1, 1]], [[0.0, 1.0]])
