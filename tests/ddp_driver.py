"""Run by ``tests/test_ddp.py`` under ``torchrun --nproc_per_node=2``: ``ddp_driver.py OUT CONFIG [key=value ...]``.

Two things each rank does, for the test to compare with one process:

1. **One update on fixed rollouts**: the policy of ``CONFIG`` wrapped in DDP, this rank's share of
   the data (``SampleStream`` with its rank), the fixed completions of ``test_policy.fixed_buffer``,
   one ``update_pass`` with SGD at lr 1 (``UPDATE_OVERRIDES``); the trainable weights go to
   ``OUT/update-rank{R}.safetensors``.
2. **The real training run**: ``grpo.train.main(CONFIG ...)``, unchanged, except that the sample
   ids ``next_batch`` returns are also written to ``OUT/drawn-rank{R}.jsonl``, one line per step
   (only observed: the samples and images go back to the loop as they were).
"""

from __future__ import annotations

import json
import os
import sys
from collections import Counter
from pathlib import Path

import torch
from safetensors.torch import save_file
from test_policy import fixed_buffer

import grpo.train as loop
from grpo.config import load_config
from grpo.policy import build_policy

UPDATE_PROMPTS = 2  # per rank
# β = 0 (no reference), and no gradient clipping, which would hide a gradient of the wrong scale
UPDATE_OVERRIDES = ["grpo.kl_coef=0", "train.max_grad_norm=1e9"]


def update_on_fixed_rollouts(out: Path, cfg, rank: int, world: int) -> None:
    policy, _, processor = build_policy(cfg, torch.device("cpu"))
    ddp = torch.nn.parallel.DistributedDataParallel(policy)
    train_set = loop.read_train_set(cfg)
    stream = loop.SampleStream(len(train_set.samples), cfg.train.seed, rank, world)
    samples, images = loop.next_batch(stream, train_set.samples, UPDATE_PROMPTS, Counter())
    buf = fixed_buffer(processor, (samples, images, train_set.rating_values))
    loop.update_pass(ddp.train(), torch.optim.SGD(policy.parameters(), lr=1.0), buf, cfg, torch.device("cpu"))
    save_file({n: p.detach().contiguous() for n, p in policy.named_parameters() if p.requires_grad},
              out / f"update-rank{rank}.safetensors")  # fmt: skip


def main() -> None:
    out, argv = Path(sys.argv[1]), sys.argv[2:]
    rank, world, _ = loop.setup_distributed("cpu")
    update_on_fixed_rollouts(out, load_config(argv[0], [*argv[1:], *UPDATE_OVERRIDES]), rank, world)

    real = loop.next_batch

    def recorded(stream, samples, size, skipped):
        batch, images = real(stream, samples, size, skipped)
        with open(out / f"drawn-rank{rank}.jsonl", "a") as fh:
            fh.write(json.dumps([s.sample_id for s in batch]) + "\n")
        return batch, images

    loop.next_batch = recorded
    loop.main(argv)


if __name__ == "__main__":
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    main()
