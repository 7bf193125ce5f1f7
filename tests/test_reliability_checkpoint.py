"""Bad input, checkpoint side: resume survives a damaged checkpoint, loads fail in one line, a
failed save leaves the previous checkpoint as it was, and a kill during a save loses nothing.

One short real run (3 steps, a checkpoint after every step) is trained once per module; each test
damages a copy of it with real file operations (delete, truncate, flip bytes, fill the disk).
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

import pytest
import torch
from safetensors.torch import load_file

from common.config import load_config
from common.errors import CheckpointError
from common.manifest import MANIFEST, check_model_source, read_task, verify_checkpoint, write_manifest
from grpo.run.checkpoint import checkpoint_dirs, load_trainer_state, resolve_resume, trim_logs
from grpo.train import train

STEPS = 3


def tiny_config(model_dir, data_root, out, *overrides):
    base = [
        f"model.name_or_path={model_dir}", "model.dtype=float32", f"data.root={data_root}",
        f"train.output_dir={out}", "train.device=cpu", f"train.steps={STEPS}", "train.lr=1e-3",
        "train.warmup_steps=1", "train.save_every=1", "train.keep_last=3", "grpo.group_size=4",
        "grpo.prompts_per_step=2", "grpo.max_new_tokens=12", "grpo.minibatch_size=8", "grpo.kl_coef=0.04",
        "eval.every=0",
    ]  # fmt: skip
    return load_config("experiments/tiny.yaml", base + list(overrides))


def cli_args(cfg_overrides: list[str]) -> list[str]:
    return [sys.executable, "-m", "grpo.train", "experiments/tiny.yaml", *cfg_overrides]


@pytest.fixture(scope="module")
def run(cold_tiny_dir, synthetic_ir, tmp_path_factory, one_thread):
    """A finished 3-step run with checkpoints 1, 2 and 3."""
    out = tmp_path_factory.mktemp("ckpt") / "run"
    train(tiny_config(cold_tiny_dir, synthetic_ir, out))
    assert [p.name for p in checkpoint_dirs(out)] == [f"checkpoint-{s:06d}" for s in (1, 2, 3)]
    return out


def copy_run(run: Path, tmp_path: Path) -> Path:
    dst = tmp_path / "run"
    shutil.copytree(run, dst)
    return dst


def flip_bytes(path: Path, at: float = 0.5, n: int = 16) -> None:
    """Garble n bytes in the middle of a file, keeping its size."""
    data = bytearray(path.read_bytes())
    i = int(len(data) * at)
    data[i : i + n] = bytes(b ^ 0xFF for b in data[i : i + n])
    path.write_bytes(bytes(data))


def truncate(path: Path, keep: float = 0.5) -> None:
    path.write_bytes(path.read_bytes()[: int(path.stat().st_size * keep)])


DAMAGE = {
    "model deleted": lambda c: (c / "model.safetensors").unlink(),
    "model truncated": lambda c: truncate(c / "model.safetensors"),
    "model garbled": lambda c: flip_bytes(c / "model.safetensors"),
    "optimizer truncated": lambda c: truncate(c / "optimizer.safetensors", 0.9),
    "optimizer zero bytes": lambda c: (c / "optimizer.safetensors").write_bytes(b""),
    "rng garbled": lambda c: flip_bytes(c / "rng.safetensors", 0.9, 4),
    "rng deleted": lambda c: (c / "rng.safetensors").unlink(),
    "trainer state garbled": lambda c: flip_bytes(c / "trainer_state.json", 0.3, 3),
    "trainer state zero bytes": lambda c: (c / "trainer_state.json").write_text(""),
    "trainer state deleted": lambda c: (c / "trainer_state.json").unlink(),
    "config deleted": lambda c: (c / "config.yaml").unlink(),
    "tokenizer garbled": lambda c: flip_bytes(c / "tokenizer.json", 0.5, 8),
    "manifest truncated": lambda c: truncate(c / MANIFEST),
    "manifest garbled": lambda c: (c / MANIFEST).write_text('{"format": 1, "files": [1, 2]}'),
    "extra byte appended": lambda c: (c / "config.json").write_bytes((c / "config.json").read_bytes() + b" "),
}
NAMES = {  # the file the message must name
    "model": "model.safetensors", "optimizer": "optimizer.safetensors", "rng": "rng.safetensors",
    "trainer": "trainer_state.json", "config": "config.yaml", "tokenizer": "tokenizer.json",
    "manifest": MANIFEST, "extra": "config.json",
}  # fmt: skip


@pytest.mark.parametrize("damage", sorted(DAMAGE))
def test_resume_auto_skips_a_damaged_newest_checkpoint(run, tmp_path, damage, capsys):
    out = copy_run(run, tmp_path)
    newest = out / "checkpoint-000003"
    verify_checkpoint(newest, need_trainer_state=True)  # intact before the damage
    DAMAGE[damage](newest)
    with pytest.raises(CheckpointError) as err:
        verify_checkpoint(newest, need_trainer_state=True)
    message = str(err.value)
    assert "\n" not in message and NAMES[damage.split()[0]] in message and str(newest) in message
    assert resolve_resume("auto", out) == out / "checkpoint-000002"
    said = capsys.readouterr().err
    assert (
        "resuming from" in said and "checkpoint-000002" in said and "skipped newer checkpoint-000003" in said
    )
    assert NAMES[damage.split()[0]] in said, "it says why it skipped the newer one"
    with pytest.raises(CheckpointError, match=NAMES[damage.split()[0]]):  # an explicit path is not replaced
        resolve_resume(str(newest), out)


def test_no_intact_checkpoint_is_an_error_not_a_fresh_start(run, tmp_path):
    out = copy_run(run, tmp_path)
    for c in checkpoint_dirs(out):
        truncate(c / "optimizer.safetensors")
    with pytest.raises(CheckpointError, match="no intact checkpoint.*checkpoint-000003.*checkpoint-000001"):
        resolve_resume("auto", out)
    with pytest.raises(CheckpointError, match="not found"):
        resolve_resume(str(out / "checkpoint-000099"), out)
    assert resolve_resume("auto", tmp_path / "no-run-yet") is None


def test_a_checkpoint_without_manifest_is_checked_by_parsing(run, tmp_path):
    # checkpoints written before manifests: accepted if every file parses, refused if one does not
    out = copy_run(run, tmp_path)
    ckpt = out / "checkpoint-000003"
    (ckpt / MANIFEST).unlink()
    assert verify_checkpoint(ckpt, need_trainer_state=True) >= 5
    truncate(ckpt / "rng.safetensors", 0.99)
    with pytest.raises(CheckpointError, match="rng.safetensors"):
        verify_checkpoint(ckpt)


def test_consistent_manifest_but_bad_content_is_a_one_line_load_error(run, tmp_path, tiny):
    # a manifest only proves the bytes are the ones written; a state that was wrong when written
    # (here: a key removed, manifest rewritten to match) still fails in one line naming the file
    out = copy_run(run, tmp_path)
    ckpt = out / "checkpoint-000003"
    state = json.loads((ckpt / "trainer_state.json").read_text())
    del state["numpy_rng"]
    (ckpt / "trainer_state.json").write_text(json.dumps(state))
    write_manifest(ckpt)
    verify_checkpoint(ckpt, need_trainer_state=True)
    model, _ = tiny
    optimizer = torch.optim.AdamW([p for p in model.parameters()], lr=0.0)
    with pytest.raises(CheckpointError, match=r"trainer_state.json.*numpy_rng"):
        load_trainer_state(ckpt, optimizer)


def test_resume_past_a_damaged_checkpoint_is_exact_and_trims_a_partial_log_line(
    run, cold_tiny_dir, synthetic_ir, tmp_path, one_thread, capsys
):
    out = copy_run(run, tmp_path)
    truncate(out / "checkpoint-000003" / "model.safetensors")
    with open(out / "metrics.jsonl", "a") as fh:  # a crash in the middle of an append
        fh.write('{"step": 4, "reward_mean": 0.1')
    with open(out / "completions.jsonl", "a") as fh:
        fh.write('{"step": 4, "te')
    final = train(tiny_config(cold_tiny_dir, synthetic_ir, out, "train.resume=auto"))
    err = capsys.readouterr().err
    assert "resuming from" in err and "checkpoint-000002" in err and "model.safetensors" in err
    assert "dropped 1 partial or unreadable line" in err
    a, b = load_file(run / "checkpoint-000003/model.safetensors"), load_file(final / "model.safetensors")
    assert all(torch.equal(a[k], b[k]) for k in a), "resumed from step 2, step 3 is re-run bit for bit"
    verify_checkpoint(final, need_trainer_state=True)

    def strip(path):  # timings and peak memory differ between runs; everything else must not
        rows = [json.loads(x) for x in path.read_text().splitlines()]
        return [
            {k: v for k, v in r.items() if not k.startswith(("time/", "memory/")) and k != "tokens_per_s"}
            for r in rows
        ]

    assert strip(out / "metrics.jsonl") == strip(run / "metrics.jsonl")
    assert [json.loads(x)["step"] for x in (out / "completions.jsonl").read_text().splitlines()] == [
        json.loads(x)["step"] for x in (run / "completions.jsonl").read_text().splitlines()
    ]


def test_trim_logs_by_hand(tmp_path, capsys):
    rows = [{"step": s, "x": s} for s in (1, 2, 3, 4)]
    lines = [json.dumps(r) + "\n" for r in rows]
    # a garbled line in the middle, invalid UTF-8, a row without a step, and a partial last line
    (tmp_path / "metrics.jsonl").write_bytes(
        "".join(lines[:2]).encode()
        + b"\xff\xfe garbage\n"
        + b'{"x": 1}\n'
        + "".join(lines[2:]).encode()
        + b'{"st'
    )
    trim_logs(tmp_path, 3)
    assert (tmp_path / "metrics.jsonl").read_text() == "".join(lines[:3])
    assert "dropped 3 partial or unreadable line(s)" in capsys.readouterr().err
    trim_logs(tmp_path, 3)  # nothing left to trim: the file is untouched and nothing is said
    assert capsys.readouterr().err == ""


def test_checkpoint_records_the_scale_and_a_resume_cannot_change_it(
    run, cold_tiny_dir, synthetic_ir, tmp_path, one_thread
):
    info = read_task(run / "checkpoint-000003")
    assert info == {
        "task": "rating",
        "rating_values": (1, 2, 3, 4, 5, 6, 7),
        "rating_field": "overall_rating",
    }
    out = copy_run(run, tmp_path)
    cfg = tiny_config(
        cold_tiny_dir, synthetic_ir, out, "train.resume=auto", "train.steps=4", "data.rating_max=6"
    )
    with pytest.raises(CheckpointError, match=r"scale \(1, 2, 3, 4, 5, 6, 7\).*\(1, 2, 3, 4, 5, 6\)"):
        train(cfg)
    (out / "checkpoint-000003" / "task.json").write_text('{"task": "rating", "rating_values": [1, 12]}')
    with pytest.raises(CheckpointError, match="task.json is damaged"):
        read_task(out / "checkpoint-000003")


def test_model_folder_checks(run, tmp_path, tiny_dir):
    with pytest.raises(CheckpointError, match="not found"):
        check_model_source(str(tmp_path / "nope"))
    with pytest.raises(CheckpointError, match="not found"):
        check_model_source("runs/does/not/exist")  # looks like a path: not a hub id error
    check_model_source("Qwen/Qwen2.5-VL-7B-Instruct")  # a hub id is left to the hub
    check_model_source(str(tiny_dir))  # no manifest: parsed
    copy = tmp_path / "tiny"
    shutil.copytree(tiny_dir, copy)
    truncate(copy / "model.safetensors", 0.7)
    with pytest.raises(CheckpointError, match="model.safetensors"):
        check_model_source(str(copy))
    (copy / "config.json").unlink()
    with pytest.raises(CheckpointError, match="no config.json"):
        check_model_source(str(copy))


def _limit_file_size(limit: int):
    def set_limit():
        resource.setrlimit(resource.RLIMIT_FSIZE, (limit, limit))  # writes beyond fail with EFBIG

    return set_limit


def test_a_failed_save_is_one_line_and_keeps_the_previous_checkpoint(
    run, cold_tiny_dir, synthetic_ir, tmp_path
):
    out = copy_run(run, tmp_path)
    before = {p.name: p.stat().st_size for p in (out / "checkpoint-000003").iterdir()}
    model_bytes = (out / "checkpoint-000003" / "model.safetensors").stat().st_size
    # Files may grow to the model's size but not to the optimizer's (twice as large): the save of
    # step 4 fails on a real write, as on a full disk.
    args = [f"model.name_or_path={cold_tiny_dir}", f"data.root={synthetic_ir}", f"train.output_dir={out}",
            "train.device=cpu", "train.steps=4", "train.lr=1e-3", "train.warmup_steps=1", "train.save_every=1",
            "train.keep_last=3", "grpo.group_size=4", "grpo.prompts_per_step=2", "grpo.max_new_tokens=12",
            "grpo.minibatch_size=8", "eval.every=0", "train.resume=auto"]  # fmt: skip
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.run(cli_args(args), capture_output=True, text=True, timeout=600, env=env,
                          preexec_fn=_limit_file_size(model_bytes + 1_000_000))  # fmt: skip
    assert proc.returncode == 2, proc.stderr[-3000:]
    assert "Traceback" not in proc.stderr
    last = proc.stderr.strip().splitlines()[-1]
    assert last.startswith("error: could not save") and "checkpoint-000004" in last
    assert "File too large" in last and "checkpoint-000003 is intact" in last
    assert [p.name for p in checkpoint_dirs(out)] == [f"checkpoint-{s:06d}" for s in (1, 2, 3)]
    assert not [p for p in out.iterdir() if p.name.startswith(".")], "no temporary folder left behind"
    assert {p.name: p.stat().st_size for p in (out / "checkpoint-000003").iterdir()} == before
    verify_checkpoint(out / "checkpoint-000003", need_trainer_state=True)


def test_kill_during_save_then_resume_ends_identical(run, cold_tiny_dir, synthetic_ir, tmp_path):
    """kill -9 while a checkpoint is being written; every checkpoint name left verifies, and the
    resumed run ends bit-identical to the uninterrupted one."""
    out = tmp_path / "killed"
    args = [f"model.name_or_path={cold_tiny_dir}", f"data.root={synthetic_ir}", f"train.output_dir={out}",
            "train.device=cpu", f"train.steps={STEPS}", "train.lr=1e-3", "train.warmup_steps=1",
            "train.save_every=1", "train.keep_last=3", "grpo.group_size=4", "grpo.prompts_per_step=2",
            "grpo.max_new_tokens=12", "grpo.minibatch_size=8", "grpo.kl_coef=0.04", "eval.every=0",
            "train.resume=auto"]  # fmt: skip
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.Popen(cli_args(args), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=env)
    deadline = time.monotonic() + 300
    try:
        while time.monotonic() < deadline and proc.poll() is None:
            tmp = out / ".tmp-checkpoint-000002"
            if tmp.exists() and (tmp / "model.safetensors").exists():  # mid-save of step 2
                proc.send_signal(signal.SIGKILL)
                break
            time.sleep(0.002)
    finally:
        proc.wait(timeout=60)
    assert proc.returncode == -signal.SIGKILL, "the run ended before the kill; the test did not test"
    for c in checkpoint_dirs(out):
        verify_checkpoint(c, need_trainer_state=True)
    assert resolve_resume("auto", out) == out / "checkpoint-000001"
    done = subprocess.run(cli_args(args), capture_output=True, text=True, timeout=600, env=env)
    assert done.returncode == 0, done.stderr[-3000:]
    a = load_file(run / "checkpoint-000003/model.safetensors")
    b = load_file(out / "checkpoint-000003/model.safetensors")
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_loading_for_evaluation_hashes_what_it_reads_only(run, tmp_path):
    out = copy_run(run, tmp_path)
    ckpt = out / "checkpoint-000003"
    flip_bytes(ckpt / "optimizer.safetensors")  # same size: found only by its hash
    check_model_source(str(ckpt))  # evaluation never reads the optimizer
    with pytest.raises(CheckpointError, match="optimizer.safetensors is corrupt"):
        verify_checkpoint(ckpt, need_trainer_state=True)  # a resume does
    (ckpt / "optimizer.safetensors").write_bytes(b"")  # a size mismatch is found either way
    with pytest.raises(CheckpointError, match="optimizer.safetensors is truncated"):
        check_model_source(str(ckpt))


def test_resume_auto_before_any_checkpoint_forgets_the_crashed_runs_log(
    cold_tiny_dir, synthetic_ir, tmp_path, one_thread
):
    out = tmp_path / "run"
    out.mkdir()
    (out / "metrics.jsonl").write_text('{"step": 1, "reward_mean": 0.5}\n{"step": 2, "rew')  # died at step 2
    train(tiny_config(cold_tiny_dir, synthetic_ir, out, "train.resume=auto", "train.steps=1"))
    steps = [json.loads(x)["step"] for x in (out / "metrics.jsonl").read_text().splitlines()]
    assert steps == [1], "the crashed run's lines are dropped, not mixed with the new run's"


def test_a_vanished_output_folder_is_one_line_and_is_not_made_again(tiny, tmp_path, one_thread):
    from common.errors import describe
    from grpo.run.checkpoint import log_step, save_checkpoint

    model, processor = tiny
    out = tmp_path / "run"  # the run's folder, deleted (or unmounted) under the run
    optimizer = torch.optim.AdamW(model.parameters(), lr=0.0)
    states = [{"position": 0, "torch": torch.get_rng_state(), "checksum": 0.0}]
    cfg = load_config("experiments/tiny.yaml", [f"train.output_dir={out}"])
    with pytest.raises(CheckpointError) as err:
        save_checkpoint(out, 1, model, processor, optimizer, states, cfg)
    assert str(err.value) == (
        f"could not save {out}/checkpoint-000001: the output folder no longer exists ({out}); no earlier checkpoint exists"
    )
    with pytest.raises(FileNotFoundError) as err:
        log_step(out, {"step": 1}, None, 0)
    assert describe(err.value) == f"the output folder no longer exists: {out}"
    assert not out.exists(), "neither made the folder again"
