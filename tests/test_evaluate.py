"""The evaluation (eval/evaluate.py) end to end on synthetic data, its CLI, and experiments/tables.py."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from common.config import EvalConfig
from data.synthetic import write_hpdv2, write_imagereward
from data.types import EvalGroup, ImageRef
from eval.evaluate import evaluate, main
from eval.metrics import count_pairs

ROOT = Path(__file__).resolve().parents[1]
SCALE = (1, 2, 3, 4, 5, 6, 7)
KEYS = ("imagereward_accuracy", "hpsv2_accuracy", "pairwise_accuracy")


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def ir_root(tmp_path_factory):
    out = tmp_path_factory.mktemp("eval") / "ir"
    write_imagereward(out, prompts=8, seed=0)
    return out


def _run(*args, cwd=ROOT):
    return subprocess.run([sys.executable, *args], cwd=cwd, capture_output=True, text=True, timeout=120)


def test_evaluate_imagereward_end_to_end_with_bad_images(tiny, ir_root, tmp_path):
    from data.imagereward import read_eval

    model, processor = tiny
    groups = read_eval(ir_root, split="test").groups[:3]
    good = groups[0].images
    bad = ImageRef(str(tmp_path / "missing.webp"))
    (tmp_path / "junk.png").write_bytes(b"not an image")
    groups += [
        EvalGroup("two-good-one-bad", "a blue square", (good[0], bad, good[1]), (1.0, 2.0, 3.0)),
        EvalGroup("one-good", "a red circle", (good[0], ImageRef(str(tmp_path / "junk.png"))), (1.0, 2.0)),
    ]
    cfg = EvalConfig(k=2, batch_size=6, seed=0)
    state = torch.get_rng_state()
    out = tmp_path / "out"
    report = evaluate(model, processor, groups, "imagereward", SCALE, cfg, max_new_tokens=8, out_dir=out,
                      progress=False, label="tiny")  # fmt: skip

    assert torch.equal(torch.get_rng_state(), state) and not model.training
    assert report["method"] == "rating" and report["k"] == 2 and report["label"] == "tiny"
    assert report["skipped"] == {"bad image": 2, "fewer than 2 usable images": 1}
    assert report["n_groups"] == 4 and report["n_groups_input"] == 5
    n_images = sum(len(g.images) for g in groups[:3]) + 2
    assert report["n_images"] == report["n_requests"] == n_images and report["n_rollouts"] == 2 * n_images
    kept_ranks = [list(g.ranks) for g in groups[:3]] + [[1.0, 3.0]]
    assert report["pairs"] == count_pairs(kept_ranks)["pairs"]
    assert set(report["metrics"]) == {"soft@1", "hard@1", "soft@2", "hard@2"}
    for figures in report["metrics"].values():
        assert set(figures) == set(KEYS) and all(0.0 <= figures[k] <= 1.0 for k in KEYS)
    # The tiny random model writes no well-formed answer: every hard score is min(scale) − 1 = 0,
    # a constant, which the ImageReward protocol counts as all wrong and ours as half right.
    assert report["format_rate"] == 0.0 and report["fallback_rate"] == 1.0
    assert report["metrics"]["hard@1"]["imagereward_accuracy"] == 0.0
    assert report["metrics"]["hard@1"]["pairwise_accuracy"] == 0.5
    assert 0.0 < report["soft_spread"] < 6.0 and report["images_per_s"] > 0 and report["wall_s"] > 0

    assert json.loads((out / "report.json").read_text()) == report
    rows = [json.loads(line) for line in (out / "predictions.jsonl").read_text().splitlines()]
    assert [r["group_id"] for r in rows] == [g.group_id for g in groups[:4]]
    assert rows[3]["human_ranks"] == [1.0, 3.0] and len(rows[3]["images"]) == 2
    for r in rows:
        assert len(r["scores"]["soft@2"]) == len(r["human_ranks"]) == len(r["requests"])
        assert all(len(q["texts"]) == 2 for q in r["requests"])
    summary = (out / "summary.md").read_text()
    assert "| soft@2 |" in summary and "| hard@1 |" in summary and "ImageReward acc." in summary

    # The same seed gives the same report (timings aside).
    again = evaluate(model, processor, groups, "imagereward", SCALE, cfg, max_new_tokens=8, progress=False)
    assert again["metrics"] == report["metrics"] and again["soft_spread"] == report["soft_spread"]


def test_evaluate_hpdv2_anchor_and_round_robin(tiny, tmp_path):
    from data.hpdv2 import read_eval

    model, processor = tiny
    write_hpdv2(tmp_path / "hp", prompts=8, seed=0)
    groups = read_eval(tmp_path / "hp").groups
    cfg = EvalConfig(k=1, max_groups=2, batch_size=8)
    report = evaluate(model, processor, groups, "hpdv2", None, cfg, max_new_tokens=8, progress=False)
    assert report["method"] == "anchor" and report["primary_metric"] == "hpsv2_accuracy"
    assert report["n_groups"] == 2 and report["n_images"] == 18 and report["n_requests"] == 2 * 8
    assert set(report["metrics"]) == {"soft@1", "hard@1"}
    assert all(0.0 <= v <= 1.0 for m in report["metrics"].values() for v in m.values())

    rr = evaluate(model, processor, groups[:1], "hpdv2", None, cfg, max_new_tokens=8, progress=False,
                  method="round-robin", debias=True)  # fmt: skip
    assert rr["method"] == "round-robin" and rr["debias"] and rr["n_requests"] == 72  # 9·8 ordered pairs
    with pytest.raises(ValueError, match="rating scale"):
        evaluate(model, processor, groups, "hpdv2", None, EvalConfig(method="rating"), 8, progress=False)


def test_cli_end_to_end_in_process(tiny_dir, ir_root, tmp_path, capsys):
    out = tmp_path / "cli"
    main([str(ROOT / "experiments/tiny.yaml"), f"model.name_or_path={tiny_dir}", f"data.root={ir_root}",
          "eval.max_groups=2", "eval.max_new_tokens=8", "eval.k=1", "--out", str(out), "--no-progress",
          "--label", "zero-shot"])  # fmt: skip
    report = json.loads((out / "report.json").read_text())
    assert report["label"] == "zero-shot" and report["rating_values"] == list(SCALE)
    assert report["n_groups"] == 2 and report["skipped_reading"] == {}
    assert "| soft@1 |" in capsys.readouterr().out


def test_cli_help_and_missing_data_message(tmp_path):
    helped = _run("-m", "eval.evaluate", "--help")
    assert helped.returncode == 0 and "CONFIG.yaml" in helped.stdout and "--scale" in helped.stdout
    missing = tmp_path / "nowhere"
    # The model path does not exist either: the data check must come first and load nothing.
    r = _run("-m", "eval.evaluate", "experiments/imagereward.yaml", f"data.root={missing}", f"eval.root={missing}",
             f"model.name_or_path={tmp_path / 'no-model'}")  # fmt: skip
    assert r.returncode == 2, r.stderr
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and str(missing) in lines[0] and "THUDM/ImageRewardDB" in lines[0]
    assert "no-model" not in r.stderr


def _report(label, kind, k, soft, hard):
    metric = {"imagereward": "imagereward_accuracy", "hpdv2": "hpsv2_accuracy"}[kind]
    metrics = {}
    for kk, (s, h) in zip((1, k), zip(soft, hard)):
        metrics[f"soft@{kk}"] = {m: (s if m == metric else 0.5) for m in KEYS}
        metrics[f"hard@{kk}"] = {m: (h if m == metric else 0.5) for m in KEYS}
    return {"label": label, "model": "m", "kind": kind, "method": "rating", "debias": False, "k": k,
            "primary_metric": metric, "metrics": metrics}  # fmt: skip


def test_tables_from_two_reports(tmp_path):
    a = tmp_path / "ir" / "report.json"
    b = tmp_path / "hp" / "report.json"
    a.parent.mkdir(), b.parent.mkdir()
    a.write_text(
        json.dumps(_report("trained on ImageReward", "imagereward", 3, (0.647, 0.649), (0.592, 0.60)))
    )
    b.write_text(json.dumps(_report("", "hpdv2", 1, (0.651,), (0.6,))))
    out = tmp_path / "tables.md"
    r = _run("experiments/tables.py", str(a), f"HPSv2={b}", "--out", str(out))
    assert r.returncode == 0, r.stderr
    text = out.read_text()
    assert "| trained on ImageReward | ImageReward test | imagereward | 64.7 | 64.9 |" in text  # Table 1
    assert "| HPSv2 | HPDv2 test | hpsv2 | 65.1 | — |" in text  # no Mean@3 in a k=1 report
    assert (
        "| trained on ImageReward | ImageReward test | rating | 59.2 | 64.7 | 60.0 | 64.9 |" in text
    )  # Table 2
    bad = _run("experiments/tables.py", str(tmp_path / "nope.json"))
    assert bad.returncode == 2 and "nope.json" in bad.stderr
