"""Live logging (``train.report_to``) read back with the trackers' own readers, across a resume."""

from __future__ import annotations

import glob
import json
import shutil
import struct
from pathlib import Path

import pytest

from common.config import load_config
from grpo.run.tracking import tag
from grpo.train import train

# The contract: these TRL names, one value per optimizer step (with the common prefix train/).
CONTRACT_TAGS = {
    "reward", "reward_std", "frac_reward_zero_std", "kl", "entropy", "completions/mean_length",
    "completions/min_length", "completions/max_length", "completions/clipped_ratio", "clip_ratio/low_mean",
    "clip_ratio/high_mean", "clip_ratio/region_mean", "grad_norm", "learning_rate", "rewards/format/mean",
    "time/generate", "tokens_per_s", "memory/peak_rss_gib",
}  # fmt: skip


def config(model_dir, data_root, out, *overrides):
    base = [
        f"model.name_or_path={model_dir}", "model.dtype=float32", f"data.root={data_root}",
        f"train.output_dir={out}", "train.device=cpu", "train.lr=1e-3", "train.warmup_steps=1",
        "grpo.group_size=4", "grpo.prompts_per_step=2", "grpo.max_new_tokens=12", "grpo.minibatch_size=8",
        "eval.every=0", "train.keep_last=5", "train.samples_every=2",
    ]  # fmt: skip
    return load_config("experiments/tiny.yaml", base + list(overrides))


def test_tags_are_trl_names():
    assert tag("reward_mean") == "train/reward"
    assert tag("frac_zero_std") == "train/frac_reward_zero_std"
    assert tag("clip_frac") == "train/clip_ratio/region_mean"
    assert tag("frac_truncated") == "train/completions/clipped_ratio"
    assert tag("reward/format") == "train/rewards/format/mean"
    assert tag("lr") == "train/learning_rate"
    assert tag("kl") == "train/kl" and tag("time/update") == "train/time/update"
    assert tag("eval/metrics/soft@1/imagereward_accuracy") == "eval/metrics/soft@1/imagereward_accuracy"


def read_tensorboard(folder: Path) -> dict[str, list[tuple[int, object]]]:
    """Every tag of the event files under ``folder`` → its ``(step, value)`` events, as TensorBoard's
    backend reads them (``plugin_event_accumulator``: a restarted writer's ``purge_step`` hides the
    events it supersedes). Scalars are floats, text a string, images ``[width, height, png]``."""
    from tensorboard.backend.event_processing.plugin_event_accumulator import EventAccumulator
    from tensorboard.util import tensor_util

    acc = EventAccumulator(str(folder), size_guidance={"tensors": 0})
    acc.Reload()
    out = {}
    for name in acc.Tags()["tensors"]:
        events = []
        for e in acc.Tensors(name):
            value = tensor_util.make_ndarray(e.tensor_proto)
            events.append((e.step, value.item() if value.size == 1 else list(value.flat)))
        out[name] = events
    return out


def test_tensorboard_curves_continue_across_a_resume(one_thread, tiny_dir, synthetic_ir, tmp_path):
    """Steps 1–4 logged, the process 'dies' after step 4 with its last checkpoint at step 2 (the
    step-4 checkpoint is removed), and ``train.resume=auto`` runs steps 3–4 again: TensorBoard's
    own reader sees every scalar exactly once at every step 1–4."""
    out = tmp_path / "run"
    args = (tiny_dir, synthetic_ir, out, "train.steps=4", "train.save_every=2", "train.report_to=tensorboard")
    train(config(*args))
    first = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in first] == [1, 2, 3, 4]
    shutil.rmtree(out / "checkpoint-000004")
    train(config(*args, "train.resume=auto"))
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [1, 2, 3, 4]
    assert len(list((out / "tensorboard").glob("events.out.tfevents.*"))) == 2, "one event file per process"

    tb = read_tensorboard(out / "tensorboard")
    logged = {k for r in rows for k, v in r.items() if k != "step" and isinstance(v, (int, float))}
    scalars = {tag(k) for k in logged}
    assert {f"train/{t}" for t in CONTRACT_TAGS} <= scalars, {f"train/{t}" for t in CONTRACT_TAGS} - scalars
    assert scalars <= set(tb), scalars - set(tb)
    for name in scalars:
        assert [step for step, _ in tb[name]] == [1, 2, 3, 4], f"{name}: {tb[name]}"
    for key in ("reward_mean", "kl", "entropy", "grad_norm", "completion_len_mean", "lr"):
        assert [v for _, v in tb[tag(key)]] == pytest.approx([r[key] for r in rows], rel=1e-6)
        # the resume is exact, so steps 3–4 run again give the values the 'dead' process had logged
        assert [r[key] for r in rows[2:]] == pytest.approx([r[key] for r in first[2:]], rel=1e-5)
    entropy = [v for _, v in tb["train/entropy"]]
    assert all(0 < h < 7.0 for h in entropy), f"−log π of sampled tokens, within (0, log V]: {entropy}"

    assert [step for step, _ in tb["run/config/text_summary"]] == [0], "the config is logged once"
    assert [step for step, _ in tb["run/git/text_summary"]] == [0], "the commit is logged once"
    config_text = tb["run/config/text_summary"][0][1].decode()
    assert "group_size: 4" in config_text and "report_to:" in config_text
    assert [step for step, _ in tb["samples/text_summary"]] == [2, 4], "a sample table every 2 steps"
    assert [step for step, _ in tb["samples/image_1"]] == [2, 4]
    width, height, png = tb["samples/image_1"][-1][1]
    assert int(width) <= 96 and int(height) <= 96 and png.startswith(b"\x89PNG"), "thumbnails, not originals"


def wandb_records(run_file: str):
    """The records of a wandb run file, decoded with wandb's own protobuf schema. The file is a
    LevelDB-style log: a 7-byte header, then 32 KiB blocks of chunks, each with a 7-byte header
    (CRC-32C, length, type: 1 full, 2 first, 3 middle, 4 last)."""
    from wandb.proto import wandb_internal_pb2 as pb

    data, pos, block, chunks = Path(run_file).read_bytes(), 7, 32768, []
    assert data[:4] == b":W&B", "a wandb run file starts with its magic"
    while pos + 7 <= len(data):
        left = block - pos % block
        _, length, kind = struct.unpack("<IHB", data[pos : pos + 7]) if left >= 7 else (0, 0, 0)
        if length == 0 and kind == 0:  # the zero-padded end of a block
            pos += left
            continue
        chunks.append(data[pos + 7 : pos + 7 + length])
        pos += 7 + length
        if kind in (1, 4):
            record = pb.Record()
            record.ParseFromString(b"".join(chunks))
            chunks = []
            yield record


def test_wandb_offline_writes_its_run_folder(one_thread, tiny_dir, synthetic_ir, tmp_path, monkeypatch):
    pytest.importorskip("wandb", reason="the optional wandb extra (make test installs it)")
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_SILENT", "true")
    out = tmp_path / "run"
    train(config(tiny_dir, synthetic_ir, out, "train.steps=2", "train.save_every=0", "train.report_to=wandb"))
    (run_file,) = glob.glob(str(out / "wandb" / "offline-run-*" / "run-*.wandb"))
    run_id = (out / "wandb-run-id").read_text().strip()
    assert run_file.endswith(f"run-{run_id}.wandb")
    history, config_keys = [], set()
    for record in wandb_records(run_file):
        kind = record.WhichOneof("record_type")
        if kind == "history":
            history.append({i.key or "/".join(i.nested_key): i.value_json for i in record.history.item})
        elif kind == "run":
            config_keys |= {u.key for u in record.run.config.update}
    assert [int(h["_step"]) for h in history] == [1, 2]

    for t in (
        "reward",
        "kl",
        "entropy",
        "clip_ratio/region_mean",
        "completions/mean_length",
        "learning_rate",
    ):
        assert all(f"train/{t}" in h for h in history), t
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [float(h["train/kl"]) for h in history] == pytest.approx([r["kl"] for r in rows])
    assert any(k.startswith("samples/") for k in history[1]), "the sample table at step 2"
    assert {"grpo", "train", "git_commit"} <= config_keys, config_keys

    # resumed for a third step: a second offline folder of the same run, holding step 3 only
    train(config(tiny_dir, synthetic_ir, out, "train.steps=3", "train.save_every=0", "train.report_to=wandb",
                 "train.resume=auto"))  # fmt: skip
    files = sorted(glob.glob(str(out / "wandb" / "offline-run-*" / f"run-{run_id}.wandb")))
    assert len(files) == 2, files
    (resumed,) = [f for f in files if f != run_file]
    steps = [int({i.key or "/".join(i.nested_key): i.value_json for i in r.history.item}["_step"])
             for r in wandb_records(resumed) if r.WhichOneof("record_type") == "history"]  # fmt: skip
    assert steps == [3]


@pytest.mark.parametrize("experiment", ["experiments/imagereward.yaml", "experiments/hpsv2.yaml"])
def test_shipped_real_runs_log_to_tensorboard(experiment):
    assert "tensorboard" in load_config(experiment).train.report_to
