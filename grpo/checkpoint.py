"""Checkpoints: safetensors only, written atomically, enough state to resume bit for bit.

A checkpoint folder ``OUTPUT_DIR/checkpoint-000300/`` holds

| file                     | what |
|--------------------------|------|
| model.safetensors …      | the policy in Hugging Face format (full fine-tuning) |
| adapter_model.safetensors| the LoRA adapter (LoRA runs), plus ``merged/`` when asked |
| tokenizer / processor    | ``processor_config.json``, ``preprocessor_config.json`` (the training pixel cap), tokenizer and chat template under the standard ``Qwen2_5_VLProcessor`` class: the folder loads with ``models.qwen_vl.load_policy`` and with plain transformers |
| optimizer.safetensors    | AdamW moments, flattened to ``state.{param}.{key}`` tensors |
| rng.safetensors          | torch CPU and CUDA RNG states of every rank, numpy's of rank 0 |
| trainer_state.json       | step, data position of every rank, param groups, python RNG, numpy RNG scalars |
| config.yaml              | the resolved config |

Nothing is unpickled: tensors come from safetensors and everything else from JSON. The folder
is written under a temporary name and renamed into place, so an interrupted save never
destroys the previous checkpoint; only the newest ``keep_last`` are kept.
"""

from __future__ import annotations

import json
import random
import re
import shutil
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import load_file, save_file

from grpo.config import Config, save_config
from models.qwen_vl import save_processor

_NAME = re.compile(r"checkpoint-(\d+)")


def checkpoint_dirs(output_dir: str | Path) -> list[Path]:
    """Complete checkpoints of a run, oldest first."""
    root = Path(output_dir)
    if not root.exists():
        return []
    found = [p for p in root.iterdir() if p.is_dir() and _NAME.fullmatch(p.name)]
    return sorted(found, key=lambda p: int(_NAME.fullmatch(p.name).group(1)))


def save_checkpoint(
    output_dir: str | Path,
    step: int,
    policy,
    processor,
    optimizer: torch.optim.Optimizer,
    rank_states: list[dict],
    config: Config,
    keep_last: int = 2,
    save_merged: bool = False,
) -> Path:
    """Write ``checkpoint-{step:06d}`` atomically and prune older checkpoints."""
    root = Path(output_dir)
    final = root / f"checkpoint-{step:06d}"
    tmp = root / f".tmp-checkpoint-{step:06d}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)

    policy.save_pretrained(tmp, safe_serialization=True)
    if save_merged and hasattr(policy, "merge_and_unload"):
        _save_merged(policy, tmp / "merged")
        save_processor(processor, tmp / "merged")
    save_processor(processor, tmp)

    tensors, param_groups = _flatten_optimizer(optimizer)
    save_file(tensors, tmp / "optimizer.safetensors")
    write_trainer_state(tmp, step, rank_states, param_groups, config)
    return commit(tmp, final, keep_last)


def write_trainer_state(
    tmp: Path, step: int, rank_states: list[dict], param_groups: list, config: Config
) -> None:
    """``rng.safetensors``, ``trainer_state.json`` and ``config.yaml`` of a checkpoint being written."""
    np_state = np.random.get_state()
    rng = {"numpy_keys": torch.from_numpy(np_state[1].astype(np.int64))}
    for r, rs in enumerate(rank_states):
        rng[f"torch.{r}"] = rs["torch"]
        if "cuda" in rs:
            rng[f"cuda.{r}"] = rs["cuda"]
    save_file(rng, tmp / "rng.safetensors")
    state = {
        "step": step,
        "data_positions": [rs["position"] for rs in rank_states],
        "weight_checksums": [rs["checksum"] for rs in rank_states],
        "param_groups": param_groups,
        "python_rng": _python_rng_to_json(random.getstate()),
        "numpy_rng": [np_state[0], int(np_state[2]), int(np_state[3]), float(np_state[4])],
    }
    (tmp / "trainer_state.json").write_text(json.dumps(state, indent=1))
    save_config(config, tmp / "config.yaml")


def commit(tmp: Path, final: Path, keep_last: int) -> Path:
    """Rename a fully written checkpoint into place and prune the oldest beyond ``keep_last``."""
    if final.exists():  # re-saving the same step (e.g. the end of a resumed run)
        shutil.rmtree(final)
    tmp.rename(final)
    for old in checkpoint_dirs(final.parent)[:-keep_last] if keep_last > 0 else []:
        shutil.rmtree(old)
    return final


def load_trainer_state(ckpt: str | Path, optimizer: torch.optim.Optimizer, rank: int = 0) -> dict:
    """Restore the optimizer and the RNGs of process ``rank`` from ``ckpt``; return the trainer state."""
    ckpt = Path(ckpt)
    state = json.loads((ckpt / "trainer_state.json").read_text())
    tensors = load_file(ckpt / "optimizer.safetensors")
    optimizer.load_state_dict(_unflatten_optimizer(tensors, state["param_groups"]))
    restore_rngs(ckpt, state, rank)
    return state


def restore_rngs(ckpt: Path, state: dict, rank: int) -> None:
    """Set torch's (CPU, CUDA) RNGs of process ``rank``, numpy's and python's from ``ckpt``."""
    rng = load_file(ckpt / "rng.safetensors")
    torch.set_rng_state(rng[f"torch.{rank}"])
    if torch.cuda.is_available() and f"cuda.{rank}" in rng:
        torch.cuda.set_rng_state(rng[f"cuda.{rank}"])
    name, pos, has_gauss, cached = state["numpy_rng"]
    np.random.set_state((name, rng["numpy_keys"].numpy().astype(np.uint32), pos, has_gauss, cached))
    random.setstate(_python_rng_from_json(state["python_rng"]))


def resolve_resume(resume: str, output_dir: str | Path) -> Path | None:
    """``auto`` → the newest checkpoint of the run (None if there is none); a path → that path."""
    if not resume:
        return None
    if resume == "auto":
        found = checkpoint_dirs(output_dir)
        return found[-1] if found else None
    path = Path(resume)
    if not (path / "trainer_state.json").exists():
        raise FileNotFoundError(
            f"train.resume={resume}: no trainer_state.json there; not a checkpoint folder"
        )
    return path


def _save_merged(policy, out: Path) -> None:
    """Save base + LoRA merged into plain weights, leaving the training model untouched."""
    import copy

    merged = copy.deepcopy(policy).merge_and_unload()
    merged.save_pretrained(out, safe_serialization=True)


def _flatten_optimizer(optimizer: torch.optim.Optimizer) -> tuple[dict[str, torch.Tensor], list[dict]]:
    sd = optimizer.state_dict()
    tensors = {}
    for idx, per_param in sd["state"].items():
        for key, value in per_param.items():
            t = value if torch.is_tensor(value) else torch.tensor(value)
            tensors[f"state.{idx}.{key}"] = t.detach().contiguous().cpu()
    return tensors, sd["param_groups"]


def _unflatten_optimizer(tensors: dict[str, torch.Tensor], param_groups: list[dict]) -> dict:
    state: dict[int, dict[str, torch.Tensor]] = {}
    for name, t in tensors.items():
        _, idx, key = name.split(".", 2)
        state.setdefault(int(idx), {})[key] = t
    return {"state": state, "param_groups": param_groups}


def _python_rng_to_json(state) -> list:
    version, internal, gauss = state
    return [version, list(internal), gauss]


def _python_rng_from_json(state: list):
    version, internal, gauss = state
    return (version, tuple(internal), gauss)
