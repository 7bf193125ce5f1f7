"""Judge diagnostics (eval/diagnostics.py) on hand-made cases, and in every evaluation's report."""

from __future__ import annotations

import pytest

from common.config import EvalConfig
from data.synthetic import write_hpdv2, write_imagereward
from eval.diagnostics import (
    calibration,
    hard_soft_disagreement,
    pair_outcomes,
    parse_failure_rate,
    position_consistency,
    swapped_pairs,
)
from eval.evaluate import evaluate

SCALE = (1, 2, 3, 4, 5, 6, 7)


def test_a_judge_that_always_picks_one_slot_is_fully_inconsistent():
    second = position_consistency([1.0, 1.0, 1.0], [1.0, 1.0, 1.0])  # always "the second is better"
    assert second == {"inconsistency": 1.0, "flip_rate": 1.0, "second_slot_bias": 1.0, "n_pairs": 3}
    first = position_consistency([0.0, 0.0], [0.0, 0.0])
    assert first["inconsistency"] == 1.0 and first["flip_rate"] == 1.0 and first["second_slot_bias"] == -1.0


def test_a_judge_that_looks_at_the_images_is_consistent():
    # p(B ≻ A) asked as (A, B) is 0.8; asked as (B, A) it says p(A ≻ B) = 0.2: the same judgement
    assert position_consistency([0.8, 0.3], [0.2, 0.7]) == pytest.approx(
        {"inconsistency": 0.0, "flip_rate": 0.0, "second_slot_bias": 0.0, "n_pairs": 2}
    )


def test_position_consistency_by_hand():
    # pair 1: 0.9 + 0.3 − 1 = +0.2; B wins both ways (0.9 > 0.5; 0.3 < 0.5) → no flip
    # pair 2: 0.6 + 0.6 − 1 = +0.2; B wins as (A, B), A wins as (B, A) → flip
    pc = position_consistency([0.9, 0.6], [0.3, 0.6])
    assert pc == pytest.approx(
        {"inconsistency": 0.2, "flip_rate": 0.5, "second_slot_bias": 0.2, "n_pairs": 2}
    )


def test_a_calibrated_judge_has_ece_zero():
    # 0.25 right 1 time in 4, 0.75 right 3 times in 4
    cal = calibration([0.25] * 4 + [0.75] * 4, [1, 0, 0, 0, 1, 1, 1, 0])
    assert cal["ece"] == pytest.approx(0.0) and cal["n"] == 8
    assert [(b["n"], b["predicted"], b["observed"]) for b in cal["bins"]] == [
        (4, 0.25, 0.25),
        (4, 0.75, 0.75),
    ]


def test_ece_by_hand():
    # bin [0.9, 1]: certain (1.0) and right half the time → |1 − 0.5| = 0.5, weight 2/4;
    # bin [0.1, 0.2): 0.1 and never right → |0.1 − 0| = 0.1, weight 2/4. ECE = 0.25 + 0.05 = 0.3
    assert calibration([1.0, 1.0, 0.1, 0.1], [1, 0, 0, 0])["ece"] == pytest.approx(0.3)
    # ratings on 1–7: soft 4 where people said 1, 3 scale points off over a width of 6 → 0.5
    assert calibration([4.0, 4.0], [1.0, 1.0], lo=1, hi=7)["ece"] == pytest.approx(0.5)
    assert calibration([2.0, 2.0, 6.0], [1.0, 3.0, 6.0], lo=1, hi=7)["ece"] == pytest.approx(0.0)
    assert calibration([], [])["ece"] is None


def test_parse_failures_and_hard_soft_disagreement_by_hand():
    assert parse_failure_rate([True, False, False, True]) == 0.5
    # written 2, 2, 7, 0 where the answer distribution's argmax is 2, 3, 6, 1; the last is not well formed
    assert hard_soft_disagreement([2, 2, 7, 0], [2, 3, 6, 1], [True, True, True, False]) == pytest.approx(
        2 / 3
    )
    assert hard_soft_disagreement([0.5], [1], [False]) is None


def test_pairs_from_requests():
    # ranks: image 0 best, 1 and 2 tied; (0, 1): the second is worse → 0; (1, 2) a human tie; (2, 0) → 1
    assert pair_outcomes([(0, 1), (1, 2), (2, 0)], [1, 2, 2], [0.3, 0.5, 0.9]) == ([0.3, 0.9], [0.0, 1.0])
    assert swapped_pairs([(0, 1), (1, 0), (0, 2), (2, 0), (1, 2)], [0.7, 0.4, 0.1, 0.8, 0.5]) == (
        [0.7, 0.1],
        [0.4, 0.8],
    )


@pytest.mark.usefixtures("one_thread")
def test_every_evaluation_reports_diagnostics(tiny, tmp_path):
    """Anchor: the swap check asks the first groups' comparisons again and leaves the scores as
    they were; debiased round robin measures from its own requests; rating: ECE against the
    human ratings of ImageRewardDB's layout."""
    from data.hpdv2 import read_eval as read_hpdv2
    from data.imagereward import read_eval as read_ir

    model, processor = tiny
    write_hpdv2(tmp_path / "hp", prompts=4, seed=0)
    groups = read_hpdv2(tmp_path / "hp").groups[:2]
    cfg = EvalConfig(k=1, batch_size=8, swap_groups=1)
    report = evaluate(model, processor, groups, "hpdv2", None, cfg, max_new_tokens=6, progress=False)
    d = report["diagnostics"]
    assert d["position_consistency"]["n_pairs"] == 8, "the 8 anchor comparisons of the first group"
    assert 0.0 <= d["position_consistency"]["inconsistency"] <= 1.0
    assert 0.0 <= d["ece"] <= 1.0 and d["calibration"]["n"] > 0
    assert d["parse_failure_rate"] == 1.0 - report["format_rate"]
    unchecked = evaluate(model, processor, groups, "hpdv2", None, cfg, max_new_tokens=6, progress=False,
                         position_check=False)  # fmt: skip
    assert unchecked["metrics"] == report["metrics"], "the swap check does not change the scores"
    assert unchecked["diagnostics"]["position_consistency"] is None

    rr = evaluate(model, processor, groups[:1], "hpdv2", None, cfg, max_new_tokens=6, progress=False,
                  method="round-robin", debias=True)  # fmt: skip
    assert rr["diagnostics"]["position_consistency"]["n_pairs"] == 36, "9·8/2 pairs, each asked both ways"

    write_imagereward(tmp_path / "ir", prompts=4, seed=0)
    ir = read_ir(tmp_path / "ir", "test", "overall_rating", SCALE).groups[:2]
    assert all(len(g.ratings) == len(g.images) for g in ir), "ImageRewardDB's layout carries ratings"
    rating = evaluate(model, processor, ir, "imagereward", SCALE, cfg, max_new_tokens=6, progress=False)
    assert rating["diagnostics"]["calibration"]["basis"] == "soft rating vs the human rating"
    assert 0.0 <= rating["diagnostics"]["ece"] <= 1.0 and "position_consistency" not in rating["diagnostics"]


def test_judge_diagnostics_from_group_results_by_hand():
    """Two rating rollouts of two images with human ratings 2 and 6, then the same without ratings
    (ImageReward's test.json has none), then one pair asked one way only."""
    import torch

    from data.types import EvalGroup, ImageRef
    from eval.diagnostics import judge_diagnostics
    from eval.score import GroupResult, Judgement

    def judgement(soft, hard, ok, choice):
        empty = torch.zeros(len(soft), 1)
        return Judgement(["…"] * len(soft), soft, hard, ok, [not o for o in ok], empty, empty, choice)

    images = (ImageRef("a.png"), ImageRef("b.png"))
    rated = EvalGroup("g", "p", images, (2.0, 1.0), (2.0, 6.0))
    result = GroupResult("g", "p", 2, None, [(0,), (1,)],
                         [judgement([2.0, 3.0], [2.0, 0.0], [True, False], [2.0, 3.0]),
                          judgement([6.0, 6.0], [5.0, 6.0], [True, True], [6.0, 6.0])])  # fmt: skip
    d = judge_diagnostics([result], [(rated, [0, 1])], "rating", SCALE)
    # bins of width 0.6 on 1–7: soft 2.0 → human 2 (0 off); 3.0 → 2 (1 off); 6.0, 6.0 → 6 (0 off):
    # ECE = (1/4 · 1) / 6 = 1/24
    assert d["ece"] == pytest.approx(1 / 24) and d["calibration"]["n"] == 4
    assert d["parse_failure_rate"] == 0.25
    assert d["hard_soft_disagreement"] == pytest.approx(1 / 3)  # wrote 5 where the argmax was 6
    unrated = EvalGroup("g", "p", images, (2.0, 1.0))
    d = judge_diagnostics([result], [(unrated, [0, 1])], "rating", SCALE)
    assert d["ece"] is None and d["calibration"]["basis"] == "no human ratings in this set"

    pair = GroupResult("h", "p", 2, 0, [(0, 1)], [judgement([0.9], [1.0], [True], [1.0])])
    d = judge_diagnostics([pair], [(unrated, [0, 1])], "pair", (0, 1))
    assert d["position_consistency"] is None, "asked one way only and no swap check"
    assert d["ece"] == pytest.approx(0.1), "p(second better) 0.9; people ranked the second first: 1"
    d = judge_diagnostics([pair], [(unrated, [0, 1])], "pair", (0, 1), swapped=([0.9], [0.9]))
    assert d["position_consistency"]["inconsistency"] == pytest.approx(0.8)


@pytest.mark.usefixtures("one_thread")
def test_diagnostics_of_a_bfloat16_judge_of_the_real_configuration(like_dir, tmp_path):
    """The shipped evaluation runs in bf16 (``model.dtype``) with the real processor, vocabulary and
    chat template: the soft scores and every diagnostic are finite numbers in their ranges."""
    import math

    import torch

    from data.hpdv2 import read_eval as read_hpdv2
    from models.qwen_vl import load_policy

    model, processor = load_policy(str(like_dir), dtype="bfloat16")
    assert {p.dtype for p in model.parameters()} == {torch.bfloat16}
    write_hpdv2(tmp_path / "hp", prompts=2, seed=0)
    groups = read_hpdv2(tmp_path / "hp").groups[:1]
    cfg = EvalConfig(k=1, batch_size=8, swap_groups=1)
    report = evaluate(model.eval(), processor, groups, "hpdv2", None, cfg, max_new_tokens=6, progress=False)
    d = report["diagnostics"]
    pairs = d["position_consistency"]
    assert pairs["n_pairs"] == 8
    for value in (pairs["inconsistency"], pairs["flip_rate"], d["ece"]):
        assert math.isfinite(value) and 0.0 <= value <= 1.0, d
    metrics = report["metrics"]
    assert all(math.isfinite(v) for v in metrics.values() if isinstance(v, float)), metrics
