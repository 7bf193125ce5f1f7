"""Preference-accuracy metrics, matching the official evaluation protocols exactly (docs/data-and-metrics.md).

Every function takes one list per prompt:

- ``rankings[p][i]``: the human rank level of image i of prompt p, **lower = better**, ties allowed;
- ``scores[p][i]``: the model's score for it, **higher = better**.

The two official protocols treat ties differently, so the same scores can give different numbers:

| protocol    | averaged over        | human tie   | model tie                          |
|-------------|----------------------|-------------|------------------------------------|
| ImageReward | all pairs, pooled    | pair skipped | wrong                             |
| HPSv2       | prompts (per-prompt) | correct     | broken by index (earlier = better) |
| pairwise    | all pairs, pooled    | pair skipped | half right (extra figure, ours)   |

Hard scores (sampled digits) tie often and lose those pairs under the ImageReward protocol;
soft scores almost never tie.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

Ranks = Sequence[Sequence[float]]
Scores = Sequence[Sequence[float]]


def _checked(rankings: Ranks, scores: Scores) -> list[tuple[list[float], list[float]]]:
    """Pair up prompts, as plain float lists, and fail loudly on mismatched or non-finite input."""
    if len(rankings) != len(scores):
        raise ValueError(f"{len(rankings)} prompts of rankings but {len(scores)} prompts of scores")
    prompts = []
    for p, (rank, score) in enumerate(zip(rankings, scores)):
        rank, score = [float(r) for r in rank], [float(s) for s in score]
        if len(rank) != len(score):
            raise ValueError(f"prompt {p}: {len(rank)} human ranks but {len(score)} scores")
        if not all(math.isfinite(x) for x in rank + score):
            raise ValueError(f"prompt {p}: non-finite rank or score")
        prompts.append((rank, score))
    return prompts


def _pairs(n: int):
    """All index pairs i < j of n items."""
    return ((i, j) for i in range(n) for j in range(i + 1, n))


def count_pairs(rankings: Ranks) -> dict[str, int]:
    """``pairs``: all i < j pairs over all prompts; ``human_ties``: those with equal human rank."""
    pairs = ties = 0
    for rank in rankings:
        for i, j in _pairs(len(rank)):
            pairs += 1
            ties += rank[i] == rank[j]
    return {"pairs": pairs, "human_ties": ties}


def imagereward_accuracy(rankings: Ranks, scores: Scores) -> float:
    """ImageReward's protocol (THUDM/ImageReward ``test.py::acc``), pooled over pairs.

        acc = #{i<j : h_i ≠ h_j and the model orders i, j strictly as the humans do}
              / #{i<j : h_i ≠ h_j}

    h = human rank (lower = better), s = model score (higher = better); the pair is right iff
    (h_i < h_j and s_i > s_j) or (h_i > h_j and s_i < s_j). A model tie s_i = s_j is wrong, so
    constant scores give 0.0.
    """
    right = total = 0
    for rank, score in _checked(rankings, scores):
        for i, j in _pairs(len(rank)):
            if rank[i] == rank[j]:
                continue  # human tie: not a pair
            total += 1
            right += (rank[i] < rank[j] and score[i] > score[j]) or (
                rank[i] > rank[j] and score[i] < score[j]
            )
    if total == 0:
        raise ValueError("no pair without a human tie: accuracy undefined")
    return right / total


def model_rank(score: Sequence[float]) -> list[int]:
    """Rank position of each item when sorted by score, best first (0 = best).

    The sort is stable, so tied scores keep index order: the earlier image gets the better rank.
    Equals ``argsort(argsort(-score, stable=True))``; HPSv2 builds it with ``torch.argsort(-s)``
    and ``.index(j)``.
    """
    order = sorted(range(len(score)), key=lambda i: -score[i])  # Python's sort is stable
    rank = [0] * len(score)
    for position, i in enumerate(order):
        rank[i] = position
    return rank


def hpsv2_accuracy(rankings: Ranks, scores: Scores) -> float:
    """HPSv2's protocol (tgxs002/HPSv2 ``evaluation.py::evaluate_rank`` → ``inversion_score``).

    Per prompt with n images, m = model_rank(scores) (ties broken by index order) and h = the
    human rank:

        discordant = #{i<j : (h_i > h_j and m_i < m_j) or (h_i < h_j and m_i > m_j)}
        score      = 1 − discordant / (n(n−1)/2)

    and the accuracy is the mean of the per-prompt scores. Human ties are never discordant, so
    they count as correct. Every prompt needs n ≥ 2.
    """
    per_prompt = []
    for p, (rank, score) in enumerate(_checked(rankings, scores)):
        n = len(rank)
        if n < 2:
            raise ValueError(f"prompt {p}: {n} image(s); the HPSv2 protocol needs at least 2")
        m = model_rank(score)
        discordant = sum(
            (rank[i] > rank[j] and m[i] < m[j]) or (rank[i] < rank[j] and m[i] > m[j]) for i, j in _pairs(n)
        )
        per_prompt.append(1.0 - discordant / (n * (n - 1) / 2))
    if not per_prompt:
        raise ValueError("no prompts")
    return sum(per_prompt) / len(per_prompt)


def pairwise_accuracy(rankings: Ranks, scores: Scores) -> float:
    """Pooled pairwise accuracy with model ties as a coin flip (not an official protocol).

        acc = (#strictly right + ½ · #model ties) / #{i<j : h_i ≠ h_j}

    Human ties are skipped as in ImageReward's protocol; a model tie counts as half right, so
    constant scores give 0.5 (the expected accuracy of breaking ties at random).
    """
    right = 0.0
    total = 0
    for rank, score in _checked(rankings, scores):
        for i, j in _pairs(len(rank)):
            if rank[i] == rank[j]:
                continue
            total += 1
            if score[i] == score[j]:
                right += 0.5
            else:
                right += (rank[i] < rank[j]) == (score[i] > score[j])
    if total == 0:
        raise ValueError("no pair without a human tie: accuracy undefined")
    return right / total
