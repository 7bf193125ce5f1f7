"""Resume on another number of processes, on real processes (one, or two gloo ranks under torchrun).

One chain of runs, each resuming the one before: FSDP on 2 ranks writes checkpoint 1
(``fsdp_run``); one process resumes it and writes checkpoints 2 and 3; FSDP on 2 ranks resumes
the one process's checkpoint 2. Each resume runs ``grpo.train`` unchanged under
``tests/resume_driver.py``, which writes the state every rank holds right after loading and the
sample ids the loop draws. The tests compare:

- the loaded state with the saved one, bitwise: weights and AdamW's step and moments, the saved
  shards put together here from their safetensors headers alone (each shard's offsets);
- the sample ids with the uninterrupted global order (one ``SampleStream`` of one process): the
  resumed run continues it, no sample repeated or skipped;
- what the log says was resharded, and what does not continue exactly.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file

from common.config import load_config
from common.errors import CheckpointError
from data.read import read_train_set
from grpo.run.stream import SampleStream
from models.qwen_vl import load_policy

pytestmark = pytest.mark.slow
ROOT = Path(__file__).resolve().parents[1]
B = 2  # prompts per step and rank, as in conftest.torchrun


def train_args(model, data, out: Path, steps: int) -> list[str]:
    return [
        "experiments/tiny.yaml", f"model.name_or_path={model}", f"data.root={data}", f"train.output_dir={out}",
        "model.dtype=float32", "train.device=cpu", f"train.steps={steps}", "train.lr=1e-3", "train.warmup_steps=1",
        "grpo.group_size=4", f"grpo.prompts_per_step={B}", "grpo.max_new_tokens=24", "grpo.minibatch_size=4",
        "grpo.kl_coef=0.04", "eval.every=0", "train.strategy=fsdp", "train.save_every=1", "train.keep_last=3",
        "train.log_completions=8", "train.resume=auto",
    ]  # fmt: skip


def run_driver(obs: Path, args: list[str], nproc: int) -> subprocess.CompletedProcess:
    """``tests/resume_driver.py obs args`` in one process, or on ``nproc`` ranks under torchrun."""
    launcher = [] if nproc == 1 else ["-m", "torch.distributed.run", f"--nproc_per_node={nproc}"]
    cmd = [sys.executable, *launcher, str(ROOT / "tests" / "resume_driver.py"), str(obs), *args]
    env = {**os.environ, "OMP_NUM_THREADS": "1",
           "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")])}  # fmt: skip
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=600, env=env, cwd=ROOT)
    assert proc.returncode == 0, proc.stderr[-4000:]
    return proc


def resumed_from(ckpt: Path, out: Path) -> Path:
    """A fresh run folder holding only ``ckpt``: the run was preempted right after saving it."""
    out.mkdir(parents=True)
    shutil.copytree(ckpt, out / ckpt.name)
    return out


@pytest.fixture(scope="module")
def two_to_one(fsdp_run, cold_tiny_dir, synthetic_ir, tmp_path_factory):
    """FSDP on 2 ranks wrote checkpoint 1; one process resumes it and runs to step 3."""
    root, _ = fsdp_run
    out = resumed_from(root / "fsdp" / "checkpoint-000001", tmp_path_factory.mktemp("to1") / "run")
    proc = run_driver(out.parent / "obs", train_args(cold_tiny_dir, synthetic_ir, out, 3), nproc=1)
    return out, proc


@pytest.fixture(scope="module")
def one_to_two(two_to_one, cold_tiny_dir, synthetic_ir, tmp_path_factory):
    """One process wrote checkpoint 2 (resumed from FSDP's 1); FSDP on 2 ranks resumes it to step 3."""
    one, _ = two_to_one
    out = resumed_from(one / "checkpoint-000002", tmp_path_factory.mktemp("to2") / "run")
    proc = run_driver(out.parent / "obs", train_args(cold_tiny_dir, synthetic_ir, out, 3), nproc=2)
    return out, proc


def consolidated(folder: Path) -> dict[str, torch.Tensor]:
    """Whole tensors from the shard files of ``folder``, placed by the offsets each file's header
    records (DCP's ``DCP_SHARDING_INFO``): a reader independent of DCP's."""
    pieces: dict[str, list] = {}
    for path in sorted(folder.glob("*.safetensors")):
        with safe_open(str(path), framework="pt") as fh:
            offsets = json.loads(fh.metadata()["DCP_SHARDING_INFO"])
            for key in fh.keys():
                pieces.setdefault(key, []).append((offsets[key]["saved_offsets"], fh.get_tensor(key)))
    whole = {}
    for key, parts in pieces.items():
        size = [max(o[d] + t.shape[d] for o, t in parts) for d in range(parts[0][1].dim())]
        whole[key] = torch.empty(size, dtype=parts[0][1].dtype)
        for o, t in parts:
            whole[key][tuple(slice(a, a + n) for a, n in zip(o, t.shape))] = t
    return whole


def saved_sharded(ckpt: Path) -> dict[str, torch.Tensor]:
    """A sharded checkpoint's weights and AdamW state, named as ``tests/resume_driver.py`` names them."""
    model, optim = consolidated(ckpt / "model_shards"), consolidated(ckpt / "optimizer_shards")
    return {**{f"model.{k}": v for k, v in model.items()}, **{f"optim.{k}": v for k, v in optim.items()}}


def saved_unsharded(ckpt: Path) -> dict[str, torch.Tensor]:
    """An unsharded checkpoint's weights (as transformers loads them) and AdamW state (by index)."""
    model, _ = load_policy(str(ckpt), dtype=torch.float32)
    names = [n for n, p in model.named_parameters()]  # every weight trains in tiny.yaml
    out = {f"model.{n}": p.detach() for n, p in model.named_parameters()}
    for key, t in load_file(ckpt / "optimizer.safetensors").items():
        _, i, what = key.split(".", 2)
        out[f"optim.{names[int(i)]}.{what}"] = t
    return out


def assert_bitwise(loaded: dict, saved: dict) -> None:
    assert set(loaded) == set(saved), set(loaded) ^ set(saved)
    assert any(k.endswith(".exp_avg_sq") for k in saved) and any(k.endswith(".step") for k in saved)
    for k in saved:
        assert loaded[k].dtype == saved[k].dtype and torch.equal(loaded[k], saved[k]), k


def global_order(cfg_args: list[str], first: int, count: int) -> list[str]:
    """Sample ids ``first .. first+count-1`` of the uninterrupted order (one process, one stream)."""
    cfg = load_config(cfg_args[0], cfg_args[1:])
    samples = read_train_set(cfg).samples
    one = SampleStream(len(samples), cfg.train.seed)
    ids = [samples[one.next_index()].sample_id for _ in range(first + count)]
    return ids[first:]


def drawn(obs: Path, rank: int) -> list[list[str]]:
    return [json.loads(line) for line in (obs / f"drawn-rank{rank}.jsonl").read_text().splitlines()]


def test_fsdp_on_two_resumes_on_one_process(two_to_one, fsdp_run, cold_tiny_dir, synthetic_ir):
    out, proc = two_to_one
    obs = out.parent / "obs"
    assert (
        "resharded checkpoint-000001: written by fsdp on 2 processes, resumed by one process; weights, AdamW "
        "moments, step 1 and the learning-rate schedule load exactly; the data order continues at global sample 4"
    ) in proc.stderr
    assert "not exact: torch's RNG is one stream per rank (the streams of rank(s) 1 end)" in proc.stderr
    assert "a step now takes 2 prompts instead of 4" in proc.stderr

    root, _ = fsdp_run
    assert_bitwise(
        load_file(obs / "loaded-rank0.safetensors"), saved_sharded(root / "fsdp" / "checkpoint-000001")
    )

    # step 1 took global samples 0-3 on two ranks; one process takes 4-5, then 6-7
    args = train_args(cold_tiny_dir, synthetic_ir, out, 3)
    assert drawn(obs, 0) == [global_order(args, 4, 2), global_order(args, 6, 2)]
    logged = [json.loads(line) for line in (out / "completions.jsonl").read_text().splitlines()]
    assert [r["sample_id"] for r in logged if r["step"] > 1][::4] == global_order(args, 4, 4), (
        "the log says so too"
    )
    state = json.loads((out / "checkpoint-000003" / "trainer_state.json").read_text())
    assert (state["data_positions"], state["data_start"], state["data_done"]) == ([4], 4, [])
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    before = [json.loads(line) for line in (root / "fsdp" / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [2, 3]
    assert [r["lr"] for r in rows] == [r["lr"] for r in before[1:]], "the schedule continues where it was"


def test_one_process_resumes_under_fsdp_on_two(one_to_two, two_to_one, cold_tiny_dir, synthetic_ir):
    out, proc = one_to_two
    obs = out.parent / "obs"
    assert (
        "resharded checkpoint-000002: written by one process, resumed by fsdp on 2 processes" in proc.stderr
    )
    assert "rank(s) 1 start new streams from train.seed + rank" in proc.stderr
    assert "a step now takes 4 prompts instead of 2" in proc.stderr

    one, _ = two_to_one
    saved = saved_unsharded(one / "checkpoint-000002")
    for r in (0, 1):  # each rank's shards, gathered: both hold the saved model, resharded
        assert_bitwise(load_file(obs / f"loaded-rank{r}.safetensors"), saved)

    # checkpoint 2 had taken global samples 0-5; step 3 on two ranks takes 6-9, split between them
    args = train_args(cold_tiny_dir, synthetic_ir, out, 3)
    (r0,), (r1,) = drawn(obs, 0), drawn(obs, 1)
    assert not set(r0) & set(r1) and sorted(r0 + r1) == sorted(global_order(args, 6, 4))
    sharded = out / "checkpoint-000003"
    assert (sharded / "model_shards").is_dir() and (sharded / "model.safetensors").is_file()


def test_too_few_gpus_for_a_resume_is_one_line_before_loading(fsdp_run, real_files, synthetic_ir, tmp_path):
    """The 7B's real configuration (config files only: no weight exists to load) resumed from a
    checkpoint of 2 ranks by one process: the memory plan of one process refuses it, saying how
    many GPUs it needs, before any weight is read."""
    from grpo.run.memory_plan import device_memory, plan_for_config
    from grpo.train import train

    root, _ = fsdp_run
    ckpt = root / "fsdp" / "checkpoint-000001"
    overrides = [f"model.name_or_path={real_files}", f"data.root={synthetic_ir}", "eval.every=0",
                 "train.device=cpu", f"train.output_dir={tmp_path / 'run'}", f"train.resume={ckpt}"]  # fmt: skip
    cfg = load_config("experiments/imagereward.yaml", overrides)
    with pytest.raises(CheckpointError) as err:
        train(cfg)
    said = str(err.value)
    assert f"{ckpt} was written by fsdp on 2 processes; on 1 ×" in said and "\n" not in said
    fewest = int(said.split("resume on at least ")[1].split()[0])
    memory = device_memory(torch.device("cpu"))  # on CPU, this host's memory stands in for a GPU's
    assert fewest > 1 and plan_for_config(cfg, fewest, memory)["fits"]
    assert not plan_for_config(cfg, fewest - 1, memory)["fits"], "the fewest, not just enough"
