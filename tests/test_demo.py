"""``make demo`` at CI size: the same script, the pairs half exactly as ``make demo`` runs it and the
rating half cut to 60 GRPO steps, and proof that both learn.

Why this cannot pass by luck or fail by host: the assertions are learning bars, well below what
the measured runs of this seed reached (``experiments/robust.py``, ``docs/demo.md``), not the demo's
full targets. Pairs, with dynamic sampling, seed 1: gains of 0.55 (this host's kernels) and 0.46
(AVX2 kernels) in pair accuracy (bar 0.25), 0.32 and 0.38 in anchor soft accuracy (bar 0.15); the
other seeds' runs that learned gained at least 0.40 and 0.23, and one of the grid's runs (seed 5,
weights moved by 2 ulps) did not learn (docs/demo.md). The rating half's first 60 steps are the
first 60 steps of the demo's rating run (a constant learning rate after the warm-up, so a shorter
run is the same run cut short): the mean reward of steps 51–60 was above that of steps 1–10 by
0.74 on this very configuration (seed 1; 0.85 with the AVX2 kernels), and by 0.10–0.44 on the
other seeds' runs (bar 0.15: it holds for seed 1, not for every seed). The held-out accuracy at
step 50 is not asserted.
The report, table and plot are checked for their documented shape.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent


@pytest.mark.slow
def test_demo_learns_both_halves_and_reports_them(tmp_path):
    out = tmp_path / "demo"
    cmd = [
        sys.executable,
        str(ROOT / "experiments" / "demo.py"),
        "--out",
        str(out),
        "--seed",
        "1",
        "--steps",
        "60",
    ]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=1800, cwd=ROOT)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]

    report = json.loads((out / "report.json").read_text())
    for stage in ("zero_shot", "trained"):
        for key in ("hard", "soft", "hard_mean3", "soft_mean3"):
            assert 0.0 <= report["imagereward"][stage][key] <= 1.0
        for key in ("hard", "soft", "soft_mean3", "pair_accuracy"):
            assert 0.0 <= report["hpsv2"][stage][key] <= 1.0
    assert 0.8 < report["hpsv2"]["ceiling"] < 0.95  # the anchor protocol's ceiling on this synthetic set
    assert report["wall_seconds"] > 0 and "colour_mapping" in report["imagereward"]
    assert (out / "reward_curve.png").stat().st_size > 10_000
    summary = (out / "summary.md").read_text()
    assert "Table 2" in summary and "ceiling" in summary and "Targets:" in summary

    # The pairs half, as make demo runs it: GRPO taught it to compare.
    hp = report["hpsv2"]
    zero, trained = hp["zero_shot"], hp["trained"]
    assert trained["pair_accuracy"] >= zero["pair_accuracy"] + 0.25, (zero, trained)
    assert trained["soft"] >= zero["soft"] + 0.15, (zero, trained)
    assert trained["soft"] >= trained["hard"], trained
    pair_rows = [json.loads(line) for line in (out / "grpo-hpdv2" / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in pair_rows] == list(range(1, hp["grpo_steps"] + 1))
    assert hp["kept_step"] in [r["step"] for r in pair_rows if "eval/soft_spread" in r]

    # The rating half, 60 GRPO steps: the reward rises.
    rows = [
        json.loads(line) for line in (out / "grpo-imagereward" / "metrics.jsonl").read_text().splitlines()
    ]
    assert [r["step"] for r in rows] == list(range(1, 61))
    first, last = (sum(r["reward_mean"] for r in part) / len(part) for part in (rows[:10], rows[50:60]))
    assert last > first + 0.15, f"GRPO did not raise the reward: {first:.3f} → {last:.3f}"
