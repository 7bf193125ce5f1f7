"""Run by ``tests/test_ddp.py`` and ``tests/test_fsdp.py`` under ``torchrun --nproc_per_node=2``:
``ddp_driver.py [--update-only] [--chunk-bytes N] OUT CONFIG [key=value ...]``.

Two things each rank does, for the test to compare with one process:

1. **One update on fixed rollouts**: the policy of ``CONFIG`` wrapped for ``train.strategy`` (DDP,
   or FSDP2 units as ``grpo.train`` builds them), this rank's share of
   the data (``SampleStream`` with its rank), the fixed completions of ``test_policy.fixed_buffer``,
   one ``update_pass`` with SGD at lr 1 (``UPDATE_OVERRIDES``); the trainable weights go to
   ``OUT/start-rank{R}.safetensors`` before it and ``OUT/update-rank{R}.safetensors`` after it
   (whole tensors, gathered from the shards under FSDP).
   ``--chunk-bytes N`` sets ``models.logprobs.LOGITS_CHUNK_BYTES``, so that the log-prob passes
   run several chunks of logits on a small vocabulary;
2. **The real training run** (not with ``--update-only``): ``grpo.train.main(CONFIG ...)``, unchanged, except that the sample
   ids ``next_batch`` returns are also written to ``OUT/drawn-rank{R}.jsonl``, one line per step
   (only observed: the samples and images go back to the loop as they were).
"""

from __future__ import annotations

import argparse
import json
import os
from collections import Counter
from pathlib import Path

import torch
from safetensors.torch import save_file
from test_policy import fixed_buffer
from torch.distributed.tensor import DTensor

import grpo.train as loop
import models.logprobs
from common.config import load_config
from data.read import read_train_set
from grpo.policy import build_policy
from grpo.run.distributed import prepare, setup_distributed
from grpo.run.stream import SampleStream, next_batch

UPDATE_PROMPTS = 2  # per rank
# β = 0 (no reference), and no gradient clipping, which would hide a gradient of the wrong scale
UPDATE_OVERRIDES = ["grpo.kl_coef=0", "train.max_grad_norm=1e9"]


def update_on_fixed_rollouts(out: Path, cfg, rank: int, world: int) -> None:
    policy, _, processor = build_policy(cfg, torch.device("cpu"))
    policy, _, train_model = prepare(cfg, policy, None, world, torch.device("cpu"))
    train_set = read_train_set(cfg)
    stream = SampleStream(len(train_set.samples), cfg.train.seed, rank, world)
    samples, images = next_batch(stream, train_set.samples, UPDATE_PROMPTS, Counter())
    buf = fixed_buffer(processor, (samples, images, train_set.rating_values))
    optimizer = torch.optim.SGD(policy.parameters(), lr=1.0)
    save_file(trainable_weights(policy), out / f"start-rank{rank}.safetensors")
    loop.update_pass(train_model.train(), optimizer, buf, cfg, torch.device("cpu"))
    save_file(trainable_weights(policy), out / f"update-rank{rank}.safetensors")


def trainable_weights(policy) -> dict[str, torch.Tensor]:
    """The trainable weights, whole (gathered from the shards under FSDP)."""
    whole = {n: p.full_tensor() if isinstance(p, DTensor) else p for n, p in policy.named_parameters()
             if p.requires_grad}  # fmt: skip
    return {n: p.detach().contiguous() for n, p in whole.items()}


def one_process_update(args: list[str]):
    """What the ranks' update must equal: one process, one update on the fixed rollouts of both
    ranks' shares (2·UPDATE_PROMPTS prompts). Returns the policy after it and its weights before."""
    cfg = load_config(args[0], [*args[1:], *UPDATE_OVERRIDES])
    policy, _, processor = build_policy(cfg, torch.device("cpu"))
    train_set = read_train_set(cfg)
    stream = SampleStream(len(train_set.samples), cfg.train.seed)
    batch, images = next_batch(stream, train_set.samples, 2 * UPDATE_PROMPTS, Counter())
    buf = fixed_buffer(processor, (batch, images, train_set.rating_values))
    start = {n: p.detach().clone() for n, p in policy.named_parameters()}
    optimizer = torch.optim.SGD(policy.parameters(), lr=1.0)
    loop.update_pass(policy.train(), optimizer, buf, cfg, torch.device("cpu"))
    return policy, start


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--update-only", action="store_true", help="skip the real training run")
    ap.add_argument("--chunk-bytes", type=int, help="models.logprobs.LOGITS_CHUNK_BYTES for this run")
    ap.add_argument("out", type=Path)
    ap.add_argument("argv", nargs="+", help="CONFIG [key=value ...], as grpo.train takes them")
    args = ap.parse_args()
    if args.chunk_bytes:
        models.logprobs.LOGITS_CHUNK_BYTES = args.chunk_bytes
    out, argv = args.out, args.argv
    rank, world, _ = setup_distributed("cpu")
    update_on_fixed_rollouts(out, load_config(argv[0], [*argv[1:], *UPDATE_OVERRIDES]), rank, world)
    if args.update_only:
        return

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
