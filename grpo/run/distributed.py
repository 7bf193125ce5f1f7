"""How ranks under ``torchrun`` hold the model: ``train.strategy = ddp | fsdp``.

    torchrun --nproc_per_node=8 -m grpo.train experiments/imagereward.yaml train.strategy=fsdp

Either way every rank samples whole groups of its own prompts, so advantages stay local, and
the ranks' gradients are averaged before each AdamW step.

- **ddp** (``DistributedDataParallel``): every rank keeps a full copy of the float32 master
  weights, their gradients (and DDP's bucket copy), both Adam moments and the reference:
  ``16–20 B`` per trainable parameter. Right for small models and LoRA.
- **fsdp** (FSDP2, ``torch.distributed.fsdp.fully_shard``): each vision block, the rest of the
  vision tower, each decoder layer, the token embeddings and the LM head are one unit each; a
  unit's parameters are float32 shards (the master weights), gathered just before the unit runs
  and freed after. Gradients are reduce-scattered in float32 after every minibatch (so no rank
  ever holds a full gradient; gradient accumulation without communication would), AdamW steps the
  shards: ``16 B / W`` per trainable parameter on each of W ranks. The frozen reference is
  sharded the same way, in ``model.dtype``, with no optimizer state. With ``model.dtype=bfloat16``
  the units compute in bf16 through FSDP's ``MixedPrecisionPolicy(param_dtype=bfloat16,
  reduce_dtype=float32)``: the all-gather casts the shards, so no autocast runs under FSDP.

Sampling under FSDP (``gathered``): ``generate`` runs one forward per new token and the ranks'
completions end at different lengths, so gathering per layer and per token would all-gather the
model T times and deadlock ranks that stop early. Instead the whole policy is gathered once per
rollout and freed after it: the cost is one full copy of the policy in compute precision on every
rank during sampling (2 B × 8.3B ≈ 15.4 GiB for the 7B in bf16) on top of the shards;
``python -m grpo.memory`` counts it in the rollout phase. Evaluation gathers the same way.

Under FSDP: activation checkpointing works (the layers recompute inside their unit); β = 0 works
(no reference is built); LoRA is refused (``check_supported``): its trainable state is small and
the bf16 base fits every GPU replicated, so DDP is the strategy for it.
"""

from __future__ import annotations

import os
import re
import signal
import sys
import traceback
from collections.abc import Callable, Iterator
from contextlib import contextmanager

import torch
import torch.distributed as dist
from torch.distributed.checkpoint.api import CheckpointException
from torch.distributed.fsdp import FSDPModule, MixedPrecisionPolicy, fully_shard
from torch.distributed.tensor import DTensor

from common.config import Config, ConfigError
from common.errors import CheckpointError, RankAgreedError, Stopped, UserError, one_line
from common.manifest import reason
from grpo.run.checkpoint import SAVE_ERRORS
from models.qwen_vl import resolve_device, unwrap


def setup_distributed(device_name: str) -> tuple[int, int, torch.device]:
    """Rank, world size and device (``train.device``); initialises the process group under torchrun."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    use_cuda = resolve_device(device_name).startswith("cuda")
    if use_cuda:
        local = int(os.environ.get("LOCAL_RANK", "0"))
        torch.cuda.set_device(local)
        device = torch.device("cuda", local)
    else:
        device = torch.device("cpu")
    if world > 1 and not dist.is_initialized():
        dist.init_process_group("nccl" if use_cuda else "gloo")
    return rank, world, device


_PEER_GONE = re.compile(
    r"Connection (reset|closed|refused)|closed by peer|Broken pipe"
)  # gloo's and NCCL's words


def say(e: BaseException) -> str:
    """One line for ``e``: a user error's own message; a collective that failed because a peer is
    gone (gloo and NCCL raise a plain ``RuntimeError``) said so, shortly; else ``common.manifest.reason``."""
    if isinstance(e, UserError):
        return str(e)
    text = one_line(e)
    if type(e) is RuntimeError and _PEER_GONE.search(text):
        core = re.sub(r"^\[[^\]]*\]\s*", "", text).split(". This is typically")[0]  # drop the source line
        return f"a rank stopped or lost its connection ({core})"
    return reason(e)


@contextmanager
def lost_rank_is_one_line() -> Iterator[None]:
    """Under torchrun, a collective that fails because another rank died (killed, out of memory)
    ends with rank 0's one line instead of a traceback from each surviving rank."""
    try:
        yield
    except RuntimeError as e:
        text = say(e)
        if not (dist.is_initialized() and text.startswith("a rank stopped")):
            raise
        raise Stopped(f"{text}; train.resume=auto continues from the last complete checkpoint") from None


def stop_on_sigterm() -> None:
    """SIGTERM raises ``Stopped``, so that a rank told to stop (torchrun stops every rank when one
    fails; a cluster stops a preempted job) ends with rank 0's one line, through the save under way."""

    def stop(signum, frame):
        raise Stopped("stopped by SIGTERM (torchrun stops every rank when one fails, a cluster a preempted job); "
                      "train.resume=auto continues from the last complete checkpoint")  # fmt: skip

    signal.signal(signal.SIGTERM, stop)


@contextmanager
def leave_distributed() -> Iterator[None]:
    """Run a command's body, then leave the process group, also after an error (SIGTERM back to its
    default first: a rank that has said its one line may be stopped while it leaves).

    A rank under torchrun then ends at once with the body's exit status (``os._exit``, after
    flushing its output), without the interpreter's finalisation: gloo's worker threads outlive
    ``destroy_process_group`` (the model's device mesh still holds the group), and one that
    releases its last finished collective (the tensors of an ``all_gather_object``) while the
    interpreter shuts down cannot take the GIL and aborts the process (SIGABRT, "terminate called
    without an active exception"), now and then, on a run that had ended well. One process: the
    body ends as it would without this."""
    try:
        yield
        status = 0
    except SystemExit as e:
        if not dist.is_initialized():
            raise
        status = e.code if isinstance(e.code, int) else int(e.code is not None)
    except BaseException:
        if not dist.is_initialized():
            raise
        traceback.print_exc()
        status = 1
    finally:
        signal.signal(signal.SIGTERM, signal.SIG_DFL)
        distributed = dist.is_initialized()
        if distributed:
            dist.destroy_process_group()
    if distributed:
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(status)


@contextmanager
def all_ranks_learn(world: int, message: Callable[[BaseException], str] = say) -> Iterator[None]:
    """Every rank learns whether the body failed on any rank (a collective after it): a write that
    rank 0 alone does (logs, a checkpoint) and that fails on a full, read-only or vanished folder.
    If it failed, all raise the first failing rank's one-line ``message`` as ``RankAgreedError``,
    which rank 0 alone prints; a rank that died (the collective fails) is a failure too. One process:
    the body's own error, as it is."""
    if world == 1:
        yield
        return
    mine = None
    try:
        yield
    except (Stopped, *SAVE_ERRORS, CheckpointException) as e:
        mine = message(e)
    except CheckpointError as e:  # already one line (a failed save of one process's checkpoint)
        mine = str(e)
    failures: list = [None] * world
    try:
        dist.all_gather_object(failures, mine)
    except RuntimeError as e:  # a peer is gone: what this rank saw is all there is to say
        failures = [mine or message(e)]
    failed = [(r, f) for r, f in enumerate(failures) if f is not None]
    if failed:
        r, text = failed[0]
        raise RankAgreedError(text + (f" (rank {r})" if r else "")) from None


def average_across_ranks(metrics: dict, world: int) -> dict:
    """Every metric averaged over the ranks (a collective under torchrun)."""
    if world == 1:
        return metrics
    keys = sorted(metrics)
    t = torch.tensor([float(metrics[k]) for k in keys], dtype=torch.float64)
    dist.all_reduce(t)
    return {k: v / world for k, v in zip(keys, t.tolist())}


def gather_rank_states(policy, stream, world: int) -> list[dict]:
    """Each rank's data position (of its ``SampleStream``), RNG states and a weight checksum,
    collected on every rank.

    The checksums (the float64 sum of every trainable weight) must agree: DDP keeps ranks in sync;
    under FSDP it is the sum over all shards.
    """
    mine = {"position": stream.position, "start": stream.start, "done": list(stream.done),
            "torch": torch.get_rng_state(), "checksum": weight_checksum(policy)}  # fmt: skip
    if torch.cuda.is_available():
        mine["cuda"] = torch.cuda.get_rng_state()
    if world == 1:
        return [mine]
    states = [None] * world
    dist.all_gather_object(states, mine)  # pickles in transit between our own processes only
    return states


def compute_in_bf16(cfg: Config) -> bool:
    """bf16 compute over float32 masters: ``model.dtype=bfloat16`` or ``train.bf16``."""
    return cfg.train.bf16 or cfg.model.dtype == "bfloat16"


def shard(model: torch.nn.Module, bf16: bool) -> FSDPModule:
    """Apply FSDP2 to a Qwen2.5-VL model: one unit per vision block and decoder layer, then the rest.

    Units are built bottom up (``fully_shard`` of the whole model last), so each parameter
    belongs to the innermost unit that holds it.
    """
    mp = MixedPrecisionPolicy(param_dtype=torch.bfloat16 if bf16 else None, reduce_dtype=torch.float32)
    hf = unwrap(model)
    units = [*hf.model.visual.blocks, hf.model.visual, *hf.model.language_model.layers,
             hf.model.language_model.embed_tokens, hf.lm_head]  # fmt: skip
    for unit in units:
        fully_shard(unit, mp_policy=mp)
    return fully_shard(model, mp_policy=mp)


def check_supported(cfg: Config, world: int) -> None:
    """Refuse, before any model is loaded, what FSDP does not run here (one process never shards)."""
    if world > 1 and cfg.train.strategy == "fsdp" and cfg.model.lora_rank > 0:
        raise ConfigError(
            "train.strategy=fsdp with LoRA is not supported: LoRA trains a few million parameters and its "
            "bf16 base fits every GPU replicated; use train.strategy=ddp (python -m grpo.memory shows the plan)"
        )


def prepare(cfg: Config, policy, reference, world: int, device: torch.device):
    """``(policy, reference, train_model)`` for this strategy; ``train_model`` runs the update pass."""
    if world == 1:
        return policy, reference, policy
    if cfg.train.strategy == "ddp":
        ddp = torch.nn.parallel.DistributedDataParallel(
            policy, device_ids=[device.index] if device.index is not None else None
        )
        return policy, reference, ddp
    bf16 = compute_in_bf16(cfg)
    policy = shard(policy, bf16)
    if reference is not None:
        reference = shard(reference, bf16)
    return policy, reference, policy


def is_sharded(model) -> bool:
    return isinstance(model, FSDPModule)


@contextmanager
def gathered(model):
    """Gather a sharded model's parameters once for everything inside (sampling, evaluation).

    Inside, forwards run on the full parameters without any collective, so ranks may run different
    numbers of forwards; outside, every unit is sharded again. A no-op for unsharded models.
    """
    if not is_sharded(model):
        yield
        return
    units = [m for m in model.modules() if isinstance(m, FSDPModule)]
    for unit in units:
        unit.unshard()
    model.set_reshard_after_forward(False)  # recursive: no unit frees its parameters inside
    try:
        yield
    finally:
        for unit in units:
            if unit is not model:  # FSDP keeps the root unit gathered between forward and backward
                unit.set_reshard_after_forward(True, recurse=False)
            unit.reshard()


def clip_grad_norm(params: list[torch.Tensor], max_norm: float) -> float:
    """``clip_grad_norm_`` over plain or sharded (DTensor) gradients; the global norm before clipping."""
    norm = torch.nn.utils.clip_grad_norm_(params, max_norm)
    if isinstance(norm, DTensor):
        norm = norm.full_tensor()
    return float(norm)


def weight_checksum(policy) -> float:
    """The float64 sum of every trainable weight (of the whole model when sharded: ranks agree)."""
    local = [p.to_local() if isinstance(p, DTensor) else p for p in policy.parameters() if p.requires_grad]
    total = torch.tensor(sum(float(p.detach().double().sum()) for p in local), dtype=torch.float64)
    if is_sharded(policy):
        dist.all_reduce(total)
    return float(total)
