"""Run by ``tests/test_save_failures.py``: ``save_failure_driver.py OUT CKPT DISK [key=value ...]``.

An FSDP run on 2 ranks (``torchrun … -m grpo.train experiments/tiny.yaml key=value …``) is resumed
from ``CKPT`` (a sharded checkpoint of step 1) in ``OUT/disk/run`` four times, each phase as a
user would meet it:

1. ``full``: the disk cannot hold a second checkpoint, so the save of step 2 fails;
2. ``read-only``: the folder is read-only (``DISK=tmpfs`` only);
3. ``killed``: rank 1 is killed (SIGKILL) while it writes its shards of step 2;
4. ``resumed``: nothing in the way, ``train.resume=auto`` runs to the end.

``DISK=tmpfs``: ``OUT/disk`` is a 20 MB tmpfs, remounted read-only for phase 2 and to 64 MB after
it; the driver must run in a mount namespace of its own (``unshare --mount``), so the mount is
gone when it ends. ``DISK=fsize``: no mount; phase 1's processes may write no file past 3 MB
(``RLIMIT_FSIZE``, the optimizer shards are larger), and phase 2 is not run.

Each phase leaves ``OUT/{phase}.json``: the exit status, the log, the run folder's entries, and
whether the kill happened; at the end the run folder is copied to ``OUT/final``.
"""

from __future__ import annotations

import json
import os
import resource
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

GRACE_S = 600


def rank_pid(launcher: int, rank: int) -> int | None:
    """The pid of torchrun's worker of ``rank`` (found by its environment), if it is running."""
    try:
        children = Path(f"/proc/{launcher}/task/{launcher}/children").read_text().split()
        for child in children:
            if f"RANK={rank}".encode() in Path(f"/proc/{child}/environ").read_bytes().split(b"\0"):
                return int(child)
    except OSError:
        pass
    return None


def phase(out: Path, name: str, run: Path, args: list[str], fsize: int = 0, kill_during: Path | None = None):
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", "-m", "grpo.train",
           "experiments/tiny.yaml", *args, f"train.output_dir={run}"]  # fmt: skip

    def limit():
        if fsize:
            resource.setrlimit(resource.RLIMIT_FSIZE, (fsize, fsize))  # writes beyond fail with EFBIG

    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env,
                            preexec_fn=limit)  # fmt: skip
    killed, deadline = False, time.monotonic() + GRACE_S
    while kill_during is not None and not killed and proc.poll() is None and time.monotonic() < deadline:
        pid = rank_pid(proc.pid, 1) if kill_during.exists() else None
        if pid is not None:
            os.kill(pid, signal.SIGKILL)
            killed = True
        time.sleep(0.002)
    log, _ = proc.communicate(timeout=GRACE_S)
    entries = sorted(p.name for p in run.iterdir()) if run.is_dir() else None
    report = {"returncode": proc.returncode, "log": log, "entries": entries, "killed": killed}
    (out / f"{name}.json").write_text(json.dumps(report))


def main() -> None:
    out, ckpt, disk, args = Path(sys.argv[1]), Path(sys.argv[2]), sys.argv[3], sys.argv[4:]
    mount = (out / "disk").resolve()
    mount.mkdir(parents=True, exist_ok=True)
    if disk == "tmpfs":
        subprocess.run(["mount", "-t", "tmpfs", "-o", "size=20m", "tmpfs", str(mount)], check=True)
    run = mount / "run"
    run.mkdir()
    shutil.copytree(ckpt, run / ckpt.name)

    phase(out, "full", run, args, fsize=3_000_000 if disk == "fsize" else 0)
    if disk == "tmpfs":
        subprocess.run(["mount", "-o", "remount,ro", str(mount)], check=True)
        phase(out, "read-only", run, args)
        subprocess.run(["mount", "-o", "remount,rw,size=64m", str(mount)], check=True)
    phase(out, "killed", run, args, kill_during=run / ".tmp-checkpoint-000002" / "model_shards")
    phase(out, "resumed", run, args)
    shutil.copytree(run, out / "final")


if __name__ == "__main__":
    main()
