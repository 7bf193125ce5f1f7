"""``leave_distributed``: a rank under torchrun leaves the process group and ends with the body's exit
status, its output flushed, without the interpreter's finalisation (where gloo's worker threads may
abort the process); one process ends as Python would end it.

Each case runs a small script on 2 real gloo ranks (``torchrun``), or as one plain process.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
SCRIPT = """
import atexit, sys
import torch.distributed as dist
from grpo.run.distributed import leave_distributed

case = sys.argv[1]
atexit.register(lambda: print("finalised", flush=True))
with leave_distributed():
    if case != "one-process":
        dist.init_process_group("gloo")
        ranks = [None, None]
        dist.all_gather_object(ranks, dist.get_rank())
        print(f"rank {dist.get_rank()} gathered {ranks}", end="")  # no newline: only a flush shows it
    if case == "error":
        raise RuntimeError("the body failed")
    if case in ("exit", "one-process"):
        raise SystemExit(3)
"""


def run(tmp_path: Path, case: str, ranks: int = 2) -> subprocess.CompletedProcess:
    script = tmp_path / "body.py"
    script.write_text(SCRIPT)
    launch = [sys.executable] if ranks == 1 else [sys.executable, "-m", "torch.distributed.run",
                                                  f"--nproc_per_node={ranks}"]  # fmt: skip
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO)}
    return subprocess.run([*launch, str(script), case], capture_output=True, text=True, timeout=300, env=env)


def test_a_rank_that_ends_well_exits_0_with_its_output_and_skips_finalisation(tmp_path):
    done = run(tmp_path, "ok")
    assert done.returncode == 0, done.stderr[-3000:]
    assert "rank 0 gathered [0, 1]" in done.stdout and "rank 1 gathered [0, 1]" in done.stdout
    assert "finalised" not in done.stdout, "the interpreter's finalisation ran (atexit handlers)"


@pytest.mark.parametrize("case, status", [("exit", "exitcode  : 3"), ("error", "exitcode  : 1")])
def test_a_failing_rank_exits_with_the_bodys_status(tmp_path, case, status):
    done = run(tmp_path, case)
    assert done.returncode != 0
    assert status in done.stderr, done.stderr[-3000:]
    assert "exitcode  : -6" not in done.stderr
    assert "gathered [0, 1]" in done.stdout, "output written before the failure was lost"
    if case == "error":
        assert "RuntimeError: the body failed" in done.stderr, "the traceback of an unexpected error"


def test_one_process_ends_as_python_ends_it(tmp_path):
    done = run(tmp_path, "one-process", ranks=1)
    assert done.returncode == 3
    assert "finalised" in done.stdout
