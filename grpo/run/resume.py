"""Resuming a run on any number of processes, under either strategy.

A run preempted on W processes may come back on W′ (more, fewer, or one) and under another
``train.strategy``. What is loaded, and how:

| written by → resumed by | weights | AdamW moments and step |
|---|---|---|
| one process or DDP → one process or DDP | ``from_pretrained`` of the folder | ``optimizer.safetensors`` by parameter index |
| one process or DDP → FSDP on W′ | ``from_pretrained``, then sharded | ``optimizer.safetensors``, each rank reading its own slices |
| FSDP on W → FSDP on W′ | ``model_shards/``, each rank reading its own slices | ``optimizer_shards/`` the same way |
| FSDP on W → one process or DDP | ``model_shards/``, whole | ``optimizer_shards/``, whole |

The slices are read by ``torch.distributed.checkpoint`` (DCP) from the safetensors files, whose
headers carry each shard's offsets: DCP reshards a state written by W ranks into the layout of
the W′ ranks loading it (``dcp.load``; in one process, without a process group). Nothing is
gathered by hand and nothing is unpickled.

**Exact** across the change: the float32 weights, both AdamW moments and its step (bit for
bit), the step and so the learning-rate schedule, numpy's and python's RNG (those of rank 0), and
the data order: ``grpo.run.stream.continue_order`` continues the global sample sequence where the
W ranks left it, so no sample is repeated or skipped before the epoch ends.

**Not exact**, and said in the log when it happens: torch's RNG is one stream per rank. Ranks
r < min(W, W′) continue their own stream; ranks the new run adds start from ``train.seed + r``;
the streams of ranks it drops end. And ``grpo.prompts_per_step`` is per rank, so a step now takes
W′·B prompts instead of W·B. So the completions, and the run, differ from the run W ranks would
have made; with W′ = W (whatever the strategy) the resume is bit for bit.

Before any weight is loaded, a resume on another number of processes is checked against the
memory plan (``grpo.run.memory_plan``) of the new world size: too few GPUs is one line saying how
many the plan needs.
"""

from __future__ import annotations

import dataclasses
import json
import sys
import warnings
from pathlib import Path

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint import HuggingFaceStorageReader
from torch.distributed.checkpoint.api import CheckpointException
from torch.distributed.checkpoint.state_dict import (
    get_state_dict,
    set_model_state_dict,
    set_optimizer_state_dict,
)

from common.config import Config
from common.errors import CheckpointError
from common.manifest import LOAD_ERRORS, reason
from grpo.run.checkpoint import load_trainer_state, restore_rngs
from grpo.run.distributed import is_sharded
from grpo.run.memory_plan import GiB
from grpo.run.sharded_checkpoint import (
    MODEL_SHARDS,
    OPTIMIZER_SHARDS,
    dcp_cause,
    flat_optimizer_state,
    is_sharded_checkpoint,
    nested_optimizer_state,
)
from grpo.run.stream import continue_order


@dataclasses.dataclass
class Resume:
    """A checkpoint to resume from, and how it was written."""

    ckpt: Path
    state: dict  # its trainer_state.json
    sharded: bool  # it holds FSDP shards (else a Hugging Face folder + optimizer.safetensors)
    world: int  # processes that wrote it
    layout: str  # "fsdp on 2 processes", "ddp on 2 processes", "one process"

    @property
    def weights(self) -> Path | None:
        """The folder ``build_policy`` loads the weights from (None: they come from the shards)."""
        return None if self.sharded else self.ckpt


def layout(sharded: bool, world: int) -> str:
    if world == 1:
        return "one process"
    return f"{'fsdp' if sharded else 'ddp'} on {world} processes"


def plan_resume(ckpt: Path | None, cfg: Config, world: int, plan: dict) -> Resume | None:
    """How ``ckpt`` was written, read before any model is loaded; refuses a world size the memory
    ``plan`` of this run says is too small, if it is not the one the checkpoint was written by."""
    if ckpt is None:
        return None
    path = ckpt / "trainer_state.json"
    try:
        state = json.loads(path.read_text())
        written = int(state.get("world", len(state["data_positions"])))
    except (*LOAD_ERRORS, UnicodeDecodeError) as e:
        raise CheckpointError(f"cannot resume from {path}: {reason(e)}") from e
    sharded = is_sharded_checkpoint(ckpt)
    resume = Resume(ckpt, state, sharded, written, layout(sharded, written))
    if written != world and not plan["fits"]:
        fewest = plan.get("fewest_gpus")
        hint = f"resume on at least {fewest}" if fewest else "no number of them is enough"
        raise CheckpointError(
            f"{ckpt} was written by {resume.layout}; on {world} × {plan['gpu_memory_bytes'] / GiB:.0f} GiB the "
            f"memory plan needs {plan['per_rank_bytes'] / GiB:.1f} GiB per rank of {plan['usable_bytes'] / GiB:.1f} "
            f"usable: {hint} (python -m grpo.memory CONFIG --gpus N shows the plan)"
        )
    return resume


def restore(resume: Resume, policy, optimizer: torch.optim.Optimizer, rank: int, world: int,
            prompts_per_step: int) -> tuple[int, dict]:  # fmt: skip
    """Load weights (when they come from shards), optimizer and RNGs of this rank; return the step
    and the ``SampleStream`` keywords (position, start, done) that continue the data order."""
    state, ckpt = resume.state, resume.ckpt
    if not resume.sharded and not is_sharded(policy):  # one process or DDP on both sides
        load_trainer_state(ckpt, optimizer, rank)
    else:
        try:
            _load_through_dcp(resume, policy, optimizer)
        except (*LOAD_ERRORS, RuntimeError, CheckpointException) as e:
            raise CheckpointError(f"cannot resume from {ckpt}: {reason(dcp_cause(e))}") from None
        restore_rngs(ckpt, state, rank)
    positions = state["data_positions"]
    start, done = int(state.get("data_start", 0)), tuple(state.get("data_done", ()))
    if len(positions) == world:
        order = {"position": positions[rank], "start": start, "done": done}
    else:
        start, done = continue_order(positions, start, done)
        order = {"position": 0, "start": start, "done": done}
    now = layout(is_sharded(policy), world)
    if rank == 0 and (now != resume.layout):
        print(describe_change(resume, now, world, order, prompts_per_step), file=sys.stderr)
    return int(state["step"]), order


def describe_change(resume: Resume, now: str, world: int, order: dict, prompts_per_step: int) -> str:
    """Two lines: what was resharded from and to, and what does not continue exactly."""
    w, b = resume.world, prompts_per_step
    lines = [
        f"resharded {resume.ckpt.name}: written by {resume.layout}, resumed by {now}; weights, AdamW "
        f"moments, step {resume.state['step']} and the learning-rate schedule load exactly"
    ]
    if w == world:
        lines[0] += "; data order and RNG streams continue as they were"
        return "\n".join(lines)
    passed = f" (passing over {len(order['done'])} taken beyond it)" if order["done"] else ""
    lines[0] += f"; the data order continues at global sample {order['start']}{passed}"
    ranks = (f"rank(s) {', '.join(map(str, range(w, world)))} start new streams from train.seed + rank" if world > w
             else f"the streams of rank(s) {', '.join(map(str, range(world, w)))} end")  # fmt: skip
    lines.append(f"not exact: torch's RNG is one stream per rank ({ranks}), and a step now takes {world * b} prompts "
                 f"instead of {w * b} (grpo.prompts_per_step={b} per rank), so completions differ from an "
                 "uninterrupted run")  # fmt: skip
    return "\n".join(lines)


def _load_through_dcp(resume: Resume, policy, optimizer: torch.optim.Optimizer) -> None:
    """Weights (from shards) and AdamW's state into this process's layout, resharded by DCP."""
    model_sd, optim_sd = get_state_dict(policy, optimizer)  # initialises AdamW's state (lr 0, no change)
    flat = flat_optimizer_state(optim_sd)  # {"fqn.key": tensor}: DTensors under FSDP, whole otherwise
    if resume.sharded:
        _dcp_load(model_sd, resume.ckpt / MODEL_SHARDS)
        _dcp_load(flat, resume.ckpt / OPTIMIZER_SHARDS)
        set_model_state_dict(policy, model_sd)
    else:  # optimizer.safetensors names the moments by the parameter's index in the optimizer
        names = [n for n, p in policy.named_parameters() if p.requires_grad]  # the optimizer's order
        by_index = {
            f"state.{i}.{key}": t for i, n in enumerate(names) for key, t in optim_sd["state"][n].items()
        }
        _dcp_load(by_index, resume.ckpt)  # the same tensors as ``flat``'s: loaded in place
    saved_groups = resume.state["param_groups"]
    if len(saved_groups) != len(optim_sd["param_groups"]):
        raise CheckpointError(f"{resume.ckpt}: {len(saved_groups)} optimizer parameter groups, this run has "
                              f"{len(optim_sd['param_groups'])}")  # fmt: skip
    groups = [
        {**saved, "params": mine["params"]} for saved, mine in zip(saved_groups, optim_sd["param_groups"])
    ]
    set_optimizer_state_dict(
        policy, optimizer, {"state": nested_optimizer_state(flat), "param_groups": groups}
    )


def _dcp_load(state: dict, folder: Path) -> None:
    """``dcp.load`` in place from the safetensors files of ``folder``: collectively under a process
    group (each rank reads the slices its tensors hold), alone in one process."""
    with warnings.catch_warnings():  # DCP warns when it loads in one process: that is intended
        warnings.simplefilter("ignore", UserWarning)
        dcp.load(
            state, storage_reader=HuggingFaceStorageReader(str(folder)), no_dist=not dist.is_initialized()
        )
