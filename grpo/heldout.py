"""Held-out evaluation during training (``eval.every``): which groups, and the ``eval/…`` metrics.

The loop in ``grpo.train`` calls ``run_eval`` every ``eval.every`` steps; it calls down into the
scoring layer (``eval.evaluate.evaluate``), so a figure logged during training and one reported by
``python -m eval.evaluate`` are one computation.
"""

from __future__ import annotations

import torch
import torch.distributed as dist

from common.config import Config
from data.read import read_eval_set
from eval.evaluate import evaluate
from grpo.run.distributed import gathered
from grpo.run.tracking import flatten
from models.qwen_vl import unwrap


def heldout_groups(cfg: Config) -> list:
    """The held-out groups evaluated every ``eval.every`` steps: the first ``eval.max_groups``."""
    groups = read_eval_set(cfg.data.kind, cfg.eval_root, cfg.eval.split, cfg.data.rating_field,
                           cfg.data.rating_values).groups  # fmt: skip
    return groups[: cfg.eval.max_groups] if cfg.eval.max_groups else groups


def run_eval(policy, processor, groups, rating_values, cfg: Config, rank: int, world: int) -> dict:
    """Held-out evaluation on rank 0 (the others wait); returns ``eval/…`` metrics.

    It calls down into the scoring layer (``eval.evaluate.evaluate``) on a forked RNG, so
    evaluating does not change the training run's random stream.
    """
    report = {}
    with gathered(policy):  # FSDP: every rank gathers, rank 0 alone runs forwards
        if rank == 0:
            policy.eval()
            device = next(policy.parameters()).device
            with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
                report = evaluate(unwrap(policy), processor, groups, cfg.data.kind, rating_values, cfg.eval,
                                  cfg.eval_max_new_tokens, progress=False, position_check=False)  # fmt: skip
        if world > 1:
            dist.barrier()
    return {f"eval/{k}": v for k, v in flatten(report).items() if isinstance(v, (int, float))}
