"""Smoke run of the benchmark: ``experiments/bench.py --quick --workloads small`` end to end (~70 s);
the real-shape workload takes minutes per step and is left to ``make bench``."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent


@pytest.mark.slow
def test_bench_quick_runs_both_sides_on_equal_work(tmp_path):
    pytest.importorskip("trl", reason="the benchmark extra: pip install -e '.[bench]'")
    proc = subprocess.run(
        [sys.executable, str(ROOT / "experiments" / "bench.py"), "--quick", "--workloads", "small", "--out", str(tmp_path)],
        capture_output=True, text=True, timeout=600, cwd=ROOT,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]
    result = json.loads((tmp_path / "bench.json").read_text())
    assert {"ours", "trl", "speedup"} <= set(result)
    for side in ("ours", "trl"):
        s = result[side]
        assert s["completion_len_mean"] and all(x == 64 for x in s["completion_len_mean"]), "64 tokens forced"
        assert s["median_step_s"] > 0 and s["peak_rss_mb"] >= s["setup_rss_mb"] > 0
    assert result["speedup"] == pytest.approx(
        result["ours"]["completions_per_s"] / result["trl"]["completions_per_s"]
    )
    small = result["workloads"]["small"][
        "fp32"
    ]  # the public contract: workloads.{small,real}.{fp32,bf16}.{speedup,peak_rss_ratio}
    assert small["speedup"] == result["speedup"]
    assert small["peak_rss_ratio"] == pytest.approx(
        result["ours"]["peak_rss_mb"] / result["trl"]["peak_rss_mb"]
    )
    # With μ = 1 and β > 0 there is no old-log-prob pass: one reference pass (prompt + completions).
    assert result["ours"]["forward_calls_per_step"]["reference"] == 2
    assert "| fp32 | ours |" in (tmp_path / "BENCHMARKS.md").read_text()
    # Both sides under one allocator setting (glibc's fixed mmap threshold), recorded with the result.
    assert result["protocol"]["malloc_mmap_threshold"] == 1 << 20
