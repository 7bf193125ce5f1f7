"""A failed save under FSDP on 2 real ranks is one line on rank 0 and loses nothing.

``tests/save_failure_driver.py`` resumes the checkpoint of step 1 of ``fsdp_run`` four times in one
folder: on a disk too small for the next checkpoint (a 20 MB tmpfs in a mount namespace of the
test's own; where none can be mounted, a file-size limit instead), on the same disk read-only, with
rank 1 killed while it writes its shards, and at last with nothing in the way. Each failure must
be one ``error:`` line from rank 0 naming the folder and the cause (for the full disk, also the
space the checkpoint needs), leave checkpoint 1 complete and no checkpoint 2 behind; the last run
must end bit for bit where the uninterrupted run ended.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from common.manifest import verify_checkpoint
from grpo.run.checkpoint import resolve_resume

pytestmark = pytest.mark.slow
ROOT = Path(__file__).resolve().parents[1]


def private_mounts() -> list[str] | None:
    """The command prefix that runs a process in a mount namespace of its own where it may mount a
    tmpfs (as root, or as a user with user namespaces), or None."""
    for prefix in (["unshare", "--mount", "--propagation", "private"], ["unshare", "-rm"]):
        probe = [*prefix, "sh", "-c", "d=$(mktemp -d) && mount -t tmpfs -o size=1m tmpfs $d && umount $d"]
        try:
            if subprocess.run(probe, capture_output=True, timeout=30).returncode == 0:
                return prefix
        except (OSError, subprocess.TimeoutExpired):
            pass
    return None


@pytest.fixture(scope="module")
def phases(fsdp_run, cold_tiny_dir, synthetic_ir, tmp_path_factory):
    root, _ = fsdp_run
    out = tmp_path_factory.mktemp("save-failures")
    args = [f"model.name_or_path={cold_tiny_dir}", f"data.root={synthetic_ir}", "model.dtype=float32",
            "train.device=cpu", "train.steps=3", "train.lr=1e-3", "train.warmup_steps=1", "grpo.group_size=4",
            "grpo.prompts_per_step=2", "grpo.max_new_tokens=24", "grpo.minibatch_size=4", "grpo.kl_coef=0.04",
            "eval.every=0", "train.strategy=fsdp", "train.save_every=1", "train.keep_last=3",
            "train.log_completions=8", "train.resume=auto"]  # fmt: skip
    prefix = private_mounts()
    driver = [sys.executable, str(ROOT / "tests" / "save_failure_driver.py"), str(out),
              str(root / "fsdp" / "checkpoint-000001"), "tmpfs" if prefix else "fsize", *args]  # fmt: skip
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")])}
    done = subprocess.run([*(prefix or []), *driver], capture_output=True, text=True, timeout=1800, env=env,
                          cwd=ROOT)  # fmt: skip
    assert done.returncode == 0, done.stderr[-4000:]
    reports = {p.stem: json.loads(p.read_text()) for p in out.glob("*.json")}
    return out, reports, bool(prefix), root


def one_error_line(report: dict) -> str:
    """The run's one ``error:`` line; what else the log holds is the launcher's own summary."""
    log = report["log"]
    errors = [line for line in log.splitlines() if line.startswith("error:")]
    assert len(errors) == 1, f"expected one error line from rank 0, got {errors}\n{log[-3000:]}"
    assert report["returncode"] != 0
    assert "CheckpointException" not in log and "Errno" not in log, "a worker's traceback leaked"
    assert not re.search(r"exitcode: -6", log), "a rank aborted instead of exiting"
    return errors[0]


def test_disk_full_is_one_line_with_the_space_needed(phases):
    out, reports, tmpfs, _ = phases
    line = one_error_line(reports["full"])
    run = out.resolve() / "disk" / "run"
    cause = "No space left on device" if tmpfs else "File too large"
    assert line.startswith(f"error: could not save {run}/checkpoint-000002: {cause}; "), line
    need = float(re.search(r"the checkpoint needs about ([\d.]+) MB", line).group(1))
    assert 10 < need < 15, "the tiny model's float32 weights and two moments: about 12.3 MB"
    assert line.endswith("; the previous checkpoint checkpoint-000001 is intact")
    assert reports["full"]["entries"] == [
        "checkpoint-000001",
        "completions.jsonl",
        "config.yaml",
        "metrics.jsonl",
    ]


def test_read_only_folder_is_one_line(phases):
    _, reports, tmpfs, _ = phases
    if not tmpfs:
        pytest.skip("no tmpfs could be mounted here, so no folder could be made read-only for root")
    line = one_error_line(reports["read-only"])
    assert "Read-only file system" in line and "/disk/run/" in line, line


def test_rank_killed_during_the_save_is_one_line_and_auto_skips_the_half_written(phases):
    out, reports, _, _ = phases
    report = reports["killed"]
    assert report["killed"], "the save ended before the kill; the test did not test"
    line = one_error_line(report)
    assert line.startswith(f"error: could not save {out.resolve()}/disk/run/checkpoint-000002: "), line
    assert line.endswith("the previous checkpoint checkpoint-000001 is intact"), line
    assert "checkpoint-000002" not in report["entries"]


def test_resume_after_the_failures_ends_where_the_uninterrupted_run_did(phases):
    out, reports, _, root = phases
    assert reports["resumed"]["returncode"] == 0, reports["resumed"]["log"][-3000:]
    final = out / "final"
    assert sorted(p.name for p in final.iterdir() if p.name.startswith(".")) == [], "no temporary folder left"
    for step in (1, 2, 3):
        verify_checkpoint(final / f"checkpoint-{step:06d}", need_trainer_state=True)
    assert resolve_resume("auto", final) == final / "checkpoint-000003"
    a = load_file(root / "fsdp" / "checkpoint-000003" / "model.safetensors")
    b = load_file(final / "checkpoint-000003" / "model.safetensors")
    assert all(torch.equal(a[k], b[k]) for k in a), "the failures changed the run"
    ids = [json.loads(x)["sample_id"] for x in (final / "completions.jsonl").read_text().splitlines()]
    uninterrupted = (root / "fsdp" / "completions.jsonl").read_text().splitlines()
    assert ids == [json.loads(x)["sample_id"] for x in uninterrupted if json.loads(x)["step"] > 1]
