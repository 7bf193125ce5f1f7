"""Run by ``tests/test_reshard.py``, in one process or under ``torchrun``:
``resume_driver.py OUT CONFIG [key=value ...]``.

It runs ``grpo.train.main(CONFIG ...)`` unchanged and only observes it:

- right after the resume has loaded (``grpo.train.restore`` returned), every rank writes the
  whole state it holds to ``OUT/loaded-rank{R}.safetensors``: each weight (gathered from the
  shards under FSDP) as ``model.{name}`` and AdamW's state as ``optim.{name}.{step,exp_avg,exp_avg_sq}``;
- the sample ids ``next_batch`` hands the loop go to ``OUT/drawn-rank{R}.jsonl``, one line per step.
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import torch
from safetensors.torch import save_file
from torch.distributed.tensor import DTensor

import grpo.train as loop


def whole(t: torch.Tensor) -> torch.Tensor:
    return (t.full_tensor() if isinstance(t, DTensor) else t).detach().clone().contiguous()


def loaded_state(policy, optimizer) -> dict[str, torch.Tensor]:
    """Every weight and AdamW's state per parameter name, whole (a collective under FSDP)."""
    out = {f"model.{n}": whole(p) for n, p in policy.named_parameters()}
    for n, p in policy.named_parameters():
        for key, t in optimizer.state.get(p, {}).items():
            out[f"optim.{n}.{key}"] = whole(t)
    return out


def main() -> None:
    out, argv = Path(sys.argv[1]), sys.argv[2:]
    out.mkdir(parents=True, exist_ok=True)
    rank = int(os.environ.get("RANK", "0"))
    real_restore, real_next_batch = loop.restore, loop.next_batch

    def recorded_restore(resume, policy, optimizer, *args):
        result = real_restore(resume, policy, optimizer, *args)
        save_file(loaded_state(policy, optimizer), out / f"loaded-rank{rank}.safetensors")
        return result

    def recorded_next_batch(stream, samples, size, skipped):
        batch, images = real_next_batch(stream, samples, size, skipped)
        with open(out / f"drawn-rank{rank}.jsonl", "a") as fh:
            fh.write(json.dumps([s.sample_id for s in batch]) + "\n")
        return batch, images

    loop.restore, loop.next_batch = recorded_restore, recorded_next_batch
    loop.main(argv)


if __name__ == "__main__":
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    main()
