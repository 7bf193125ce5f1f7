"""Can this judge be trusted as a reward? Position consistency, calibration, parse failures, hard vs soft.

Plain numpy on scores that are already computed; no model. ``eval.evaluate`` puts the results
under ``report.json``'s ``diagnostics`` and in its printed summary (docs/monitoring.md).

- **Position consistency** (pairwise judges). The pair question shows image A first and B second
  and its soft answer ``p_ab = p(1 | C_AB)`` estimates P(B ≻ A); asked the other way round,
  ``p_ba`` estimates P(A ≻ B). A judge that looks at the images and not at the slots has
  ``p_ab + p_ba = 1``. ``inconsistency`` is the mean ``|p_ab + p_ba − 1|`` (0 consistent, 1 a
  judge that always picks the same slot), ``flip_rate`` the share of pairs whose preferred image
  changes when the slots are swapped, and ``second_slot_bias`` the mean ``p_ab + p_ba − 1``
  (+1: always the second image, −1: always the first).
- **Calibration**: the expected calibration error over equal-width bins of the prediction,
  ``ECE = Σ_b (n_b / n) · |mean prediction_b − mean outcome_b|`` (Guo et al., "On Calibration of
  Modern Neural Networks", ICML 2017, eq. 3), and the bins themselves: a reliability diagram.
  Pairs: the soft p(second ≻ first) of every rollout against the human choice (1 if people
  ranked the second image better; human ties left out). Ratings: the soft rating E[r | C]
  against the human rating, both on the rating scale; the error is divided by the scale's width
  (max − min) so that it lies in [0, 1] as for pairs.
- **Parse failures**: the share of rollouts without a well-formed ``<answer>``.
- **Hard vs soft**: among well-formed rollouts, the share whose written answer is not the soft
  score's choice, the argmax of the answer distribution it averages over (for a pair: 1 exactly
  when p(1 | C) > 0.5). A high value means the sampled answers often contradict the model's own
  answer distribution at the answer position (sampling at a high temperature).
"""

from __future__ import annotations

import numpy as np


def position_consistency(p_ab, p_ba) -> dict:
    """Inconsistency, flip rate and slot bias of pairs asked in both orders (see the module docstring).

    ``p_ab[i]`` is the soft answer to pair i asked as (A, B), ``p_ba[i]`` asked as (B, A): each the
    probability that the image shown *second* is better. Returns ``inconsistency``,
    ``flip_rate``, ``second_slot_bias`` and ``n_pairs``.
    """
    p_ab, p_ba = np.asarray(p_ab, dtype=float), np.asarray(p_ba, dtype=float)
    if p_ab.shape != p_ba.shape or p_ab.ndim != 1 or not p_ab.size:
        raise ValueError(f"need two equal, non-empty lists of answers, got {p_ab.shape} and {p_ba.shape}")
    if not ((0 <= p_ab) & (p_ab <= 1) & (0 <= p_ba) & (p_ba <= 1)).all():
        raise ValueError("answers must be probabilities in [0, 1]")
    deviation = p_ab + p_ba - 1
    b_wins_first = np.sign(p_ab - 0.5)  # +1: B preferred when shown second
    b_wins_swapped = np.sign(0.5 - p_ba)  # +1: B preferred when shown first
    return {
        "inconsistency": float(np.abs(deviation).mean()),
        "flip_rate": float((b_wins_first != b_wins_swapped).mean()),
        "second_slot_bias": float(deviation.mean()),
        "n_pairs": int(p_ab.size),
    }


def calibration(predicted, observed, lo: float = 0.0, hi: float = 1.0, bins: int = 10) -> dict:
    """ECE and the reliability diagram of predictions in [lo, hi] against outcomes on the same scale.

    Equal-width bins over [lo, hi] (the last one closed). Returns ``ece`` (divided by hi − lo),
    ``n`` and ``bins``: one ``{lo, hi, n, predicted, observed}`` per non-empty bin with the bin's
    mean prediction and mean outcome. No pairs: ``ece`` None.
    """
    predicted, observed = np.asarray(predicted, dtype=float), np.asarray(observed, dtype=float)
    if predicted.shape != observed.shape or predicted.ndim != 1:
        raise ValueError(f"predictions {predicted.shape} and outcomes {observed.shape} must be equal 1-D")
    if not hi > lo:
        raise ValueError(f"empty scale [{lo}, {hi}]")
    if not predicted.size:
        return {"ece": None, "n": 0, "bins": []}
    edges = np.linspace(lo, hi, bins + 1)
    which = np.clip(np.searchsorted(edges, predicted, side="right") - 1, 0, bins - 1)  # (n,) bin of each
    out, ece = [], 0.0
    for b in range(bins):
        inside = which == b
        if inside.any():
            mean_p, mean_o = float(predicted[inside].mean()), float(observed[inside].mean())
            ece += inside.mean() * abs(mean_p - mean_o)
            out.append({"lo": float(edges[b]), "hi": float(edges[b + 1]), "n": int(inside.sum()),
                        "predicted": mean_p, "observed": mean_o})  # fmt: skip
    return {"ece": float(ece / (hi - lo)), "n": int(predicted.size), "bins": out}


def parse_failure_rate(well_formed) -> float:
    """The share of rollouts without a well-formed answer (0 when there are none)."""
    well_formed = np.asarray(well_formed, dtype=bool)
    return float((~well_formed).mean()) if well_formed.size else 0.0


def hard_soft_disagreement(hard, choice, well_formed) -> float | None:
    """Among well-formed rollouts, the share whose written answer ``hard`` is not ``choice``, the
    argmax of the soft score's answer distribution (``models.soft_head.answer_choice``). None when
    no rollout is well formed."""
    hard, choice = np.asarray(hard, dtype=float), np.asarray(choice, dtype=float)
    keep = np.asarray(well_formed, dtype=bool)
    if hard.shape != choice.shape or hard.shape != keep.shape:
        raise ValueError(f"answers {hard.shape}, choices {choice.shape} and flags {keep.shape} must match")
    return float((hard[keep] != choice[keep]).mean()) if keep.any() else None


def pair_outcomes(requests, ranks, p_second) -> tuple[list[float], list[float]]:
    """For calibration: the soft p(second ≻ first) of each comparison ``(i, j)`` whose images people
    ranked differently, and the human outcome (1 if ``ranks[j] < ranks[i]``: the second is better)."""
    predicted, observed = [], []
    for (i, j), p in zip(requests, p_second):
        if ranks[i] != ranks[j]:
            predicted.append(float(p))
            observed.append(1.0 if ranks[j] < ranks[i] else 0.0)
    return predicted, observed


def swapped_pairs(requests, p_second) -> tuple[list[float], list[float]]:
    """Match each comparison ``(a, b)`` with a later ``(b, a)`` of the same group (a debiased run asks
    both); returns their answers ``(p_ab, p_ba)``, each pair once."""
    first_order = {}
    p_ab, p_ba = [], []
    for (i, j), p in zip(requests, p_second):
        if (j, i) in first_order:
            p_ab.append(first_order.pop((j, i)))
            p_ba.append(float(p))
        else:
            first_order[(i, j)] = float(p)
    return p_ab, p_ba


def judge_diagnostics(results, kept, task: str, values, swapped=None) -> dict:
    """The diagnostics of one evaluation (``eval.evaluate``): ``results`` are its
    ``eval.score.GroupResult`` s, ``kept`` the ``(EvalGroup, usable image indices)`` of each,
    ``swapped`` the ``(p_ab, p_ba)`` answers of a swap check (pairs asked only one way round).

    Returns ``ece``, ``calibration`` (its basis, n and bins), ``parse_failure_rate``,
    ``hard_soft_disagreement`` and, for pairs, ``position_consistency`` (None if no pair was
    asked both ways).
    """
    choice, hard, ok, predicted, observed = [], [], [], [], []
    p_ab, p_ba = swapped or ([], [])
    for result, (group, keep) in zip(results, kept):
        ranks = [group.ranks[i] for i in keep]
        ratings = [group.ratings[i] for i in keep] if len(group.ratings) == len(group.images) else None
        for idx, j in zip(result.requests, result.judgements):
            choice += j.choice
            hard += j.hard
            ok += j.well_formed
            if task == "pair":
                pred, obs = pair_outcomes([idx] * len(j.soft), ranks, j.soft)
                predicted += pred
                observed += obs
            elif ratings is not None:
                predicted += j.soft
                observed += [ratings[idx[0]]] * len(j.soft)
        if task == "pair" and swapped is None:
            ab, ba = swapped_pairs(result.requests, [j.soft[0] for j in result.judgements])
            p_ab += ab
            p_ba += ba
    if task == "pair":
        basis, cal = "soft p(second better) vs the human choice", calibration(predicted, observed)
    elif predicted:
        basis, cal = (
            "soft rating vs the human rating",
            calibration(predicted, observed, min(values), max(values)),
        )
    else:
        basis, cal = "no human ratings in this set", calibration([], [])
    out = {
        "ece": cal["ece"],
        "calibration": {"basis": basis, "n": cal["n"], "bins": cal["bins"]},
        "parse_failure_rate": parse_failure_rate(ok),
        "hard_soft_disagreement": hard_soft_disagreement(hard, choice, ok),
    }
    if task == "pair":
        out["position_consistency"] = position_consistency(p_ab, p_ba) if p_ab else None
    return out
