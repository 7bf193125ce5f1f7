"""``torchrun --nproc_per_node=2``: the ranks split the data and together do what one process does.

Completions are sampled, so two ranks cannot be compared with one process over a whole run; the
test compares what can be compared exactly (``tests/ddp_driver.py`` runs both parts):

- **data**: each rank records the sample ids the real loop hands it; per step the two ranks'
  samples are disjoint and together are the samples one process with twice the prompts draws;
- **the update**: one update pass on fixed rollouts of each rank's share, DDP averaging the
  gradients, moves the weights exactly as one process does on the union of the shares.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from ddp_driver import one_process_update
from safetensors.torch import load_file

from common.config import load_config
from data.read import read_train_set
from grpo.run.stream import SampleStream

ROOT = Path(__file__).resolve().parents[1]
B = 2  # prompts per step and rank


@pytest.mark.slow
def test_two_ranks_split_the_data_and_equal_one_process(cold_tiny_dir, synthetic_ir, tmp_path):
    """Mutations checked by hand, each fails it: giving both ranks rank 0's data
    (``SampleStream(..., rank=0)`` in ``train``); each minibatch's loss not weighted by its share
    of the batch (``weight = 1``)."""
    run, driver_out = tmp_path / "ddp", tmp_path / "driver"
    driver_out.mkdir()
    args = [
        "experiments/tiny.yaml", f"model.name_or_path={cold_tiny_dir}", f"data.root={synthetic_ir}",
        f"train.output_dir={run}", "train.steps=2", "train.device=cpu", "grpo.group_size=4",
        f"grpo.prompts_per_step={B}", "grpo.max_new_tokens=16", "grpo.minibatch_size=4", "eval.every=0",
        "train.save_every=0", f"train.log_completions={B * 4}", "train.report_to=tensorboard",
    ]  # fmt: skip
    run_driver(driver_out, [], args)
    (events,) = (run / "tensorboard").glob("events.out.tfevents.*")  # rank 0 alone logs

    # Data: disjoint shares whose union is what one process draws, step by step.
    cfg = load_config(args[0], args[1:])
    samples = read_train_set(cfg).samples
    one = SampleStream(len(samples), cfg.train.seed)
    drawn = [[json.loads(line) for line in (driver_out / f"drawn-rank{r}.jsonl").read_text().splitlines()]
             for r in (0, 1)]  # fmt: skip
    assert len(drawn[0]) == len(drawn[1]) == 2
    for step in range(2):
        r0, r1 = drawn[0][step], drawn[1][step]
        assert not set(r0) & set(r1), f"step {step + 1}: both ranks trained on {set(r0) & set(r1)}"
        assert sorted(r0 + r1) == sorted(samples[one.next_index()].sample_id for _ in range(2 * B))
    logged = [json.loads(line) for line in (run / "completions.jsonl").read_text().splitlines()]
    assert [row["sample_id"] for row in logged[::4]] == drawn[0][0] + drawn[0][1], "rank 0's log"
    state = json.loads((run / "checkpoint-000002" / "trainer_state.json").read_text())
    assert state["data_positions"] == [2 * B, 2 * B]
    sums = state["weight_checksums"]
    assert len(sums) == 2 and sums[0] == sums[1], f"ranks diverged: {sums}"

    # The update: one process on both shares (2·UPDATE_PROMPTS prompts) moves the weights alike.
    assert_ranks_updated_as_one_process(driver_out, args)


def run_driver(out: Path, flags: list[str], args: list[str]) -> None:
    """``tests/ddp_driver.py [flags] out args`` on 2 ranks under torchrun."""
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2",
           str(ROOT / "tests" / "ddp_driver.py"), *flags, str(out), *args]  # fmt: skip
    # the driver imports the checkout it lives in, whatever else is installed
    env = {
        **os.environ,
        "OMP_NUM_THREADS": "1",
        "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")]),
    }
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=600, env=env, cwd=ROOT)
    assert proc.returncode == 0, proc.stderr[-3000:]


def assert_ranks_updated_as_one_process(driver_out: Path, args: list[str]) -> None:
    """Each rank's weights after the driver's update equal one process's on the union of the shares."""
    policy, start = one_process_update(args)
    for r in (0, 1):
        ranked = load_file(driver_out / f"update-rank{r}.safetensors")
        assert set(ranked) == {n for n, p in policy.named_parameters() if p.requires_grad}
        for name, value in ranked.items():
            torch.testing.assert_close(
                value, policy.get_parameter(name).detach(), atol=1e-6, rtol=1e-5, msg=name
            )
    assert any(not torch.equal(start[n], p) for n, p in policy.named_parameters()), "the update moved nothing"
