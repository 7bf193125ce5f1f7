"""Sharded checkpoints of FSDP runs (``train.strategy=fsdp``): every rank writes its own shards.

A sharded ``checkpoint-000300/`` holds

| file / folder        | what |
|----------------------|------|
| model_shards/        | the float32 master weights, one safetensors file per rank (its shards, with their offsets in the header) |
| optimizer_shards/    | AdamW's moments and step, the same way, ``{param}.{exp_avg,exp_avg_sq,step}`` |
| rng.safetensors, trainer_state.json, config.yaml | as in ``grpo.run.checkpoint`` (``sharded: true``, the world size) |
| config.json, processor files | the model's config and the processor, so ``grpo.export`` needs nothing else |
| model.safetensors …  | the last checkpoint of a run only: the consolidated Hugging Face weights (``consolidate_weights``) |
| task.json, manifest.json | as in ``grpo.run.checkpoint``: the rating scale, and every file's size and sha256, written last |

Shards go through ``torch.distributed.checkpoint`` with its safetensors storage
(``HuggingFaceStorageWriter``): safetensors only, nothing pickled. The folder is written under a
temporary name; rank 0 renames it into place only after every rank has written its shards and
DCP has finished the save (a barrier), so a partially written checkpoint is never taken for a
complete one. The shards reshard to any number of processes on resume (``grpo.run.resume``).

**A failed save** (no space, a read-only or vanished folder, a rank that fails while writing) is
agreed on by every rank after each part of the save: all raise the same one-line
``CheckpointError`` (rank 0 alone prints it), naming the folder, the cause and, when the disk is
full, the space the checkpoint needs; rank 0 removes the temporary folder and the earlier
checkpoints stay as they were.
"""

from __future__ import annotations

import json
import shutil
import warnings
from pathlib import Path

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint import HuggingFaceStorageWriter
from torch.distributed.checkpoint.api import CheckpointException
from torch.distributed.checkpoint.state_dict import get_state_dict

from common.config import Config
from common.errors import RankAgreedError
from common.manifest import write_manifest
from grpo.run.checkpoint import commit, error_number, failed_save_message, write_trainer_state
from grpo.run.distributed import all_ranks_learn, say
from models.qwen_vl import save_processor, unwrap

MODEL_SHARDS, OPTIMIZER_SHARDS = "model_shards", "optimizer_shards"


def is_sharded_checkpoint(ckpt: str | Path) -> bool:
    return (Path(ckpt) / MODEL_SHARDS).is_dir()


def flat_optimizer_state(optim_sd: dict) -> dict[str, torch.Tensor]:
    """``{"state": {fqn: {key: tensor}}}`` → ``{"fqn.key": tensor}`` (the sharded moments stay DTensors)."""
    return {f"{fqn}.{key}": t for fqn, per in optim_sd["state"].items() for key, t in per.items()}


def nested_optimizer_state(flat: dict[str, torch.Tensor]) -> dict:
    state: dict[str, dict[str, torch.Tensor]] = {}
    for name, t in flat.items():
        fqn, key = name.rsplit(".", 1)
        state.setdefault(fqn, {})[key] = t
    return state


def save_sharded_checkpoint(
    output_dir: str | Path, step: int, policy, processor, optimizer: torch.optim.Optimizer,
    rank_states: list[dict], config: Config, keep_last: int, rank: int, consolidate: bool = False,
    task: dict | None = None,
) -> Path:  # fmt: skip
    """Write ``checkpoint-{step:06d}`` from every rank (a collective: all ranks call it)."""
    root = Path(output_dir)
    final, tmp = root / f"checkpoint-{step:06d}", root / f".tmp-checkpoint-{step:06d}"
    model_sd, optim_sd = get_state_dict(policy, optimizer)
    flat = flat_optimizer_state(optim_sd)
    need = sum(t.numel() * t.element_size() for t in [*model_sd.values(), *flat.values()])  # whole tensors

    def start() -> None:
        shutil.rmtree(tmp, ignore_errors=True)
        if not root.is_dir():
            raise FileNotFoundError(2, "the output folder no longer exists", str(root))
        tmp.mkdir()

    def shards() -> None:
        for sd, folder in ((model_sd, MODEL_SHARDS), (flat, OPTIMIZER_SHARDS)):
            dcp.save(sd, storage_writer=HuggingFaceStorageWriter(str(tmp / folder), save_distributed=True))

    def finish() -> None:
        hf = unwrap(policy)
        hf.config.save_pretrained(tmp)
        hf.generation_config.save_pretrained(tmp)
        save_processor(processor, tmp)
        write_trainer_state(tmp, step, rank_states, optim_sd["param_groups"], config, task)
        state = json.loads((tmp / "trainer_state.json").read_text())
        state.update(sharded=True, world=len(rank_states))
        (tmp / "trainer_state.json").write_text(json.dumps(state, indent=1))
        if consolidate:
            consolidate_weights(tmp, tmp)
        write_manifest(tmp)  # last: a folder without it is not a complete checkpoint
        commit(tmp, final, keep_last)

    def failed(e: BaseException) -> str:  # the message of this rank's failure, said after the clean-up
        cause = dcp_cause(e)
        if rank == 0:
            shutil.rmtree(tmp, ignore_errors=True)
        return failed_save_message(final, say(cause), error_number(cause), need)

    try:
        for part, everyone in ((start, False), (shards, True), (finish, False)):
            with all_ranks_learn(dist.get_world_size(), failed):
                if everyone or rank == 0:
                    part()
    except RankAgreedError:  # also when only another rank failed
        if rank == 0:
            shutil.rmtree(tmp, ignore_errors=True)
        raise
    return final


def dcp_cause(e: BaseException) -> BaseException:
    """The first failing rank's own exception inside DCP's ``CheckpointException`` (else ``e``)."""
    if isinstance(e, CheckpointException) and e.failures:
        inner = e.failures[min(e.failures)]
        return dcp_cause(inner[0] if isinstance(inner, tuple) else inner)
    return e


def consolidate_weights(ckpt: str | Path, out: str | Path, dtype: torch.dtype | None = None) -> Path:
    """Write the full weights of the sharded ``ckpt`` to ``out`` as a Hugging Face model folder."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint import HuggingFaceStorageReader
    from transformers import AutoConfig, GenerationConfig, Qwen2_5_VLForConditionalGeneration
    from transformers.initialization import no_init_weights

    ckpt, out = Path(ckpt), Path(out)
    config = AutoConfig.from_pretrained(ckpt, local_files_only=True)
    with no_init_weights():  # the weights are read below; buffers (rotary frequencies) are built as usual
        model = Qwen2_5_VLForConditionalGeneration(config).to(torch.float32)
    state = model.state_dict()
    with warnings.catch_warnings():  # DCP warns that it loads in one process: that is the point
        warnings.simplefilter("ignore", UserWarning)
        # in place, in this process alone (no collective, even inside a torchrun job)
        dcp.load(state, storage_reader=HuggingFaceStorageReader(str(ckpt / MODEL_SHARDS)), no_dist=True)
    if dtype is not None:
        model.to(dtype)
    if (ckpt / "generation_config.json").exists():
        model.generation_config = GenerationConfig.from_pretrained(ckpt)
    model.save_pretrained(out, safe_serialization=True)
    return out
