"""Smoke run of the serve workload: ``experiments/bench.py --workloads serve --quick`` writes the
keys of ``workloads.serve`` in ``bench.json`` (the full run is ``make bench``)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent


def test_bench_serve_quick_writes_the_contract_keys(tmp_path):
    pytest.importorskip("trl", reason="the benchmark extra: pip install -e '.[bench]'")
    pytest.importorskip("fastapi", reason='the server needs the serve extra: pip install -e ".[serve]"')
    proc = subprocess.run(
        [sys.executable, str(ROOT / "experiments" / "bench.py"), "--quick", "--workloads", "serve", "--out", str(tmp_path)],
        capture_output=True, text=True, timeout=600, cwd=ROOT, env={**os.environ, "OMP_NUM_THREADS": "1"},
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]
    serve = json.loads((tmp_path / "bench.json").read_text())["workloads"]["serve"]
    assert serve["speedup"] == pytest.approx(serve["batched_items_per_s"] / serve["sequential_items_per_s"])
    assert serve["sequential_items_per_s"] > 0 and serve["max_abs_soft_difference"] < 1e-5
    for c in ("c1", "c4", "c16"):
        assert 0 < serve["latency_ms"][c]["p50"] <= serve["latency_ms"][c]["p99"]
        assert serve["latency_ms"][c]["requests"] == int(c[1:])
    assert "**Workload serve**" in (tmp_path / "BENCHMARKS.md").read_text()
