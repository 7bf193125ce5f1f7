"""From pairwise judgements to one score per image: anchor ranking and round-robin Bradley–Terry.

The pair task shows two images of one prompt and asks which is preferred; its soft answer is
``p(1 | C)``, the probability that the **second** image is better (``data.prompts.PAIR_TEMPLATE``).
A *comparison* ``(i, j)`` shows image ``i`` first and image ``j`` second, so its answer
estimates ``P(j ≻ i)``. For the N images of one prompt this module plans which comparisons to
run and turns their answers into N scores (higher = better). Everything here is plain numpy on
already-computed probabilities; no model.

- **Anchor** (the paper's ranking, arXiv 2503.19948): draw an anchor ``a`` at random, compare
  ``(a, j)`` for every ``j ≠ a`` (N − 1 comparisons), score ``s_j = p(1 | C_{a,j})`` and
  ``s_a = 0.5``, rank by score. The draw is seeded by ``(seed, group_id)``, so a group gets the
  same anchor in every run and whatever the batch or the order of the groups.
- **Position-debiased** (ours, an option): a VLM judge may prefer the first or the second slot
  regardless of content. Also run the swapped comparison ``(j, a)`` and average the two
  estimates of ``P(j ≻ a)``: ``s_j = ½ (p(1 | C_{a,j}) + 1 − p(1 | C_{j,a}))``. Twice the cost.
- **Round robin + Bradley–Terry** (ours, an option for small N): compare every unordered pair
  once (``(i, j)``, i < j; both orders with debiasing), collect soft win counts
  ``W_ij = Σ P̂(i ≻ j)`` over the comparisons of ``i`` and ``j`` and fit the Bradley–Terry model
  ``P(i ≻ j) = π_i / (π_i + π_j)`` by Hunter's MM algorithm (Ann. Statist. 2004, eq. 3)::

      π_i ← Σ_j W'_ij / Σ_{j≠i} n'_ij / (π_i + π_j),      then rescale so that Σ_i log π_i = 0,

  with ``n'_ij = n_ij + λ`` comparisons and ``W'_ij = W_ij + λ/2`` wins: λ (``prior``) virtual
  drawn games per pair keep the MLE finite when an image wins or loses every comparison (hard,
  sampled answers do that often). The score is ``log π_i``. N(N − 1)/2 comparisons: 36 for
  HPDv2's 9 images, against 8 for the anchor.

Shapes: ``N`` images of one prompt; ``P_NN[i, j]`` estimates ``P(i ≻ j)``; ``n_NN[i, j]`` counts
the comparisons of ``i`` and ``j`` (symmetric, zero diagonal).
"""

from __future__ import annotations

import zlib

import numpy as np

Comparison = tuple[int, int]  # (first image, second image); the answer is p(second is better)


def choose_anchor(n: int, seed: int, group_id: str) -> int:
    """The anchor image of a group: uniform over ``range(n)``, fixed by ``(seed, group_id)``.

    The group id is hashed with CRC-32 (stable across processes, unlike Python's ``hash``).
    """
    if n < 1:
        raise ValueError("a group needs at least one image")
    rng = np.random.default_rng([seed, zlib.crc32(group_id.encode("utf-8"))])
    return int(rng.integers(n))


def anchor_comparisons(n: int, anchor: int, debias: bool = False) -> list[Comparison]:
    """``(a, j)`` for every ``j ≠ a`` in index order; with ``debias`` each is followed by ``(j, a)``."""
    if not 0 <= anchor < n:
        raise ValueError(f"anchor {anchor} outside 0..{n - 1}")
    out = []
    for j in range(n):
        if j != anchor:
            out += [(anchor, j), (j, anchor)] if debias else [(anchor, j)]
    return out


def round_robin_comparisons(n: int, debias: bool = False) -> list[Comparison]:
    """Every unordered pair ``(i, j)``, i < j; with ``debias`` each is followed by ``(j, i)``."""
    out = []
    for i in range(n):
        for j in range(i + 1, n):
            out += [(i, j), (j, i)] if debias else [(i, j)]
    return out


def preference_matrix(
    n: int, comparisons: list[Comparison], p_second: list[float]
) -> tuple[np.ndarray, np.ndarray]:
    """Average the comparisons into ``P_NN[i, j] ≈ P(i ≻ j)`` and the counts ``n_NN``.

    Comparison ``(i, j)`` with answer ``p = p(1 | C)`` says ``P(j ≻ i) = p`` and ``P(i ≻ j) = 1 − p``.
    Comparisons of the same pair in either order are averaged, which is exactly the position
    debiasing ``½ (p(1 | C_{i,j}) + 1 − p(1 | C_{j,i}))``. Pairs never compared hold 0.5, count 0.
    """
    if len(comparisons) != len(p_second):
        raise ValueError(f"{len(comparisons)} comparisons but {len(p_second)} answers")
    wins = np.zeros((n, n))  # (N, N): summed estimates of P(i ≻ j)
    count = np.zeros((n, n))  # (N, N): comparisons of i and j, in either order
    for (i, j), p in zip(comparisons, p_second):
        if i == j or not (0 <= i < n and 0 <= j < n):
            raise ValueError(f"bad comparison {(i, j)} for {n} images")
        if not 0.0 <= p <= 1.0:
            raise ValueError(f"p(1 | C) = {p} is not a probability")
        wins[j, i] += p
        wins[i, j] += 1.0 - p
        count[i, j] += 1
        count[j, i] += 1
    P = np.full((n, n), 0.5)
    seen = count > 0
    P[seen] = wins[seen] / count[seen]
    return P, count


def anchor_scores(n: int, anchor: int, comparisons: list[Comparison], p_second: list[float]) -> list[float]:
    """``s_j = P̂(j ≻ a)`` for ``j ≠ a`` and ``s_a = 0.5`` (both orders averaged if present)."""
    P, count = preference_matrix(n, comparisons, p_second)
    missing = [j for j in range(n) if j != anchor and count[j, anchor] == 0]
    if missing:
        raise ValueError(f"images {missing} were never compared with the anchor {anchor}")
    scores = P[:, anchor].copy()  # (N,): P(j ≻ a)
    scores[anchor] = 0.5
    return scores.tolist()


def bradley_terry(
    P_NN: np.ndarray, n_NN: np.ndarray, prior: float = 0.1, iters: int = 200, tol: float = 1e-10
) -> np.ndarray:
    """Bradley–Terry log-strengths ``log π`` (mean 0) from preference estimates, by MM.

    ``W_ij = n_ij · P_ij`` are the (soft) wins of i over j. With ``prior = λ``, every pair also
    gets λ drawn games (λ/2 wins each way); λ = 0 is the plain MLE, which is finite only if the
    comparison graph is strongly connected in wins. Returns ``(N,)``.
    """
    n = P_NN.shape[0]
    off = ~np.eye(n, dtype=bool)
    W = n_NN * P_NN + np.where(off, prior / 2, 0.0)  # (N, N) wins
    C = n_NN + np.where(off, prior, 0.0)  # (N, N) games
    if np.any(W.sum(axis=1) <= 0):
        raise ValueError("an image without any win: use prior > 0")
    log_pi = np.zeros(n)
    for _ in range(iters):
        pi = np.exp(log_pi)
        denom = (C / (pi[:, None] + pi[None, :])).sum(axis=1)  # (N,): Σ_j n_ij / (π_i + π_j)
        new = np.log(W.sum(axis=1)) - np.log(denom)
        new -= new.mean()  # BT strengths are defined up to a common factor
        if np.max(np.abs(new - log_pi)) < tol:
            log_pi = new
            break
        log_pi = new
    return log_pi


def round_robin_scores(
    n: int, comparisons: list[Comparison], p_second: list[float], prior: float = 0.1
) -> list[float]:
    """Bradley–Terry log-strengths of the N images from their comparisons (see ``bradley_terry``)."""
    if n == 1:
        return [0.0]
    P, count = preference_matrix(n, comparisons, p_second)
    return bradley_terry(P, count, prior=prior).tolist()
