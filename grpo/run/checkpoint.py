"""Checkpoints: safetensors only, written atomically, enough state to resume bit for bit.

A checkpoint folder ``OUTPUT_DIR/checkpoint-000300/`` holds

| file                     | what |
|--------------------------|------|
| model.safetensors …      | the policy in Hugging Face format (full fine-tuning) |
| adapter_model.safetensors| the LoRA adapter (LoRA runs), plus ``merged/`` when asked |
| tokenizer / processor    | ``processor_config.json``, ``preprocessor_config.json`` (the training pixel cap), tokenizer and chat template under the standard ``Qwen2_5_VLProcessor`` class: the folder loads with ``models.qwen_vl.load_policy`` and with plain transformers |
| optimizer.safetensors    | AdamW moments, flattened to ``state.{param}.{key}`` tensors |
| rng.safetensors          | torch CPU and CUDA RNG states of every rank, numpy's of rank 0 |
| trainer_state.json       | step, data position of every rank (and where the global order starts), param groups, python RNG, numpy RNG scalars |
| config.yaml              | the resolved config |
| task.json                | the task and its rating scale, which evaluation and ranking read back |
| manifest.json            | size and sha256 of every other file; written last |

Nothing is unpickled: tensors come from safetensors and everything else from JSON. The folder
is written under a temporary name and renamed into place, so an interrupted save never
destroys the previous checkpoint; only the newest ``keep_last`` are kept (older ones are
renamed away before they are deleted, so a kill during pruning leaves no half folder behind a
checkpoint name).

**Damage**: a disk that filled up, an interrupted copy or a deleted file leaves a
folder whose files do not match its manifest. ``verify_checkpoint`` finds this (every file's
size and sha256, or, for a folder without a manifest such as a downloaded model, that every
safetensors and JSON file parses) and raises ``CheckpointError`` naming the file.
``resolve_resume("auto")`` takes the newest checkpoint that verifies and says which newer ones
it skipped and why. A save that fails (no space, no permission) is one ``CheckpointError``
line; the temporary folder is removed and the previous checkpoint is untouched.
``trim_logs`` drops log lines of steps after the resumed checkpoint and a partial last line
left by a crash in the middle of an append, saying so.
"""

from __future__ import annotations

import contextlib
import errno
import json
import os
import random
import re
import shutil
import sys
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from common.config import Config, save_config
from common.errors import CheckpointError
from common.manifest import LOAD_ERRORS, reason, verify_checkpoint, write_manifest, write_task
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
    task: dict | None = None,
) -> Path:
    """Write ``checkpoint-{step:06d}`` atomically and prune older checkpoints.

    ``task`` (``{"task", "rating_values", "rating_field"}``) is written to ``task.json``. A
    failed write raises ``CheckpointError`` and leaves every earlier checkpoint as it was.
    """
    root = Path(output_dir)
    final, tmp = root / f"checkpoint-{step:06d}", root / f".tmp-checkpoint-{step:06d}"
    with failed_save_is_one_line(final, tmp, checkpoint_bytes(policy, optimizer)):
        shutil.rmtree(tmp, ignore_errors=True)
        if not root.is_dir():
            raise FileNotFoundError(2, "the output folder no longer exists", str(root))
        tmp.mkdir()
        policy.save_pretrained(tmp, safe_serialization=True)
        if save_merged and hasattr(policy, "merge_and_unload"):
            _save_merged(policy, tmp / "merged")
            save_processor(processor, tmp / "merged")
        save_processor(processor, tmp)
        tensors, param_groups = _flatten_optimizer(optimizer)
        save_file(tensors, tmp / "optimizer.safetensors")
        write_trainer_state(tmp, step, rank_states, param_groups, config, task)
        write_manifest(tmp)
    return commit(tmp, final, keep_last)


SAVE_ERRORS = (OSError, SafetensorError, RuntimeError)  # what a failed write raises
_FULL = (errno.ENOSPC, errno.EDQUOT, errno.EFBIG)  # no space, over quota, over the file-size limit


@contextlib.contextmanager
def failed_save_is_one_line(final: Path, tmp: Path, need: int = 0) -> Iterator[None]:
    """A save that fails (no space, no permission) removes ``tmp`` and raises one ``CheckpointError``
    line saying that the previous checkpoint is intact (``need``: the bytes the checkpoint takes)."""
    try:
        yield
    except SAVE_ERRORS as e:
        shutil.rmtree(tmp, ignore_errors=True)
        raise CheckpointError(failed_save_message(final, reason(e), error_number(e), need)) from e


def error_number(e: BaseException) -> int | None:
    """The OS error number of ``e``: an ``OSError``'s, or the ``(os error N)`` safetensors' Rust I/O
    errors carry in their message."""
    if isinstance(e, OSError):
        return e.errno
    found = re.search(r"\(os error (\d+)\)", str(e))
    return int(found.group(1)) if found else None


def failed_save_message(final: Path, cause: str, error: int | None, need: int) -> str:
    """``could not save FINAL: CAUSE[; the checkpoint needs about N MB, M MB free there]; the previous
    checkpoint … is intact``."""

    def size(b: float) -> str:
        return f"{b / 1e9:.1f} GB" if b >= 1e9 else f"{b / 1e6:.1f} MB"

    space = ""
    if error in _FULL and need:
        free = ""
        if error != errno.EFBIG:  # over a file-size limit, the disk's free space is beside the point
            try:
                free = f", {size(shutil.disk_usage(final.parent).free)} free there"
            except OSError:
                pass
        space = f"; the checkpoint needs about {size(need)}{free}"
    previous = [p.name for p in checkpoint_dirs(final.parent)] if final.parent.is_dir() else []
    kept = f"the previous checkpoint {previous[-1]} is intact" if previous else "no earlier checkpoint exists"
    return f"could not save {final}: {cause}{space}; {kept}"


def checkpoint_bytes(policy, optimizer: torch.optim.Optimizer) -> int:
    """Bytes of the weights and the optimizer state a checkpoint writes (the rest is small)."""
    tensors = list(policy.state_dict().values())
    tensors += [t for per in optimizer.state.values() for t in per.values() if torch.is_tensor(t)]
    return sum(t.numel() * t.element_size() for t in tensors)


def check_writable(output_dir: str | Path) -> None:
    """Create ``output_dir`` and write a file into it, so that a read-only or unwritable folder is
    found before any model is loaded (raises ``OSError``)."""
    root = Path(output_dir)
    if root.exists() and not root.is_dir():
        raise NotADirectoryError(errno.ENOTDIR, "the output folder is a file", str(root))
    root.mkdir(parents=True, exist_ok=True)
    probe = root / ".write-test"
    probe.write_bytes(b"")
    probe.unlink()


def commit(tmp: Path, final: Path, keep_last: int) -> Path:
    """Rename a fully written checkpoint (manifest last) into place; prune beyond ``keep_last``."""
    if final.exists():  # re-saving the same step (e.g. the end of a resumed run): swap, then delete
        doomed = _set_aside(final)
        tmp.rename(final)
        shutil.rmtree(doomed)
    else:
        tmp.rename(final)
    # Prune only checkpoints at or before this step: higher numbers are from an earlier run of
    # this folder that was resumed from further back (e.g. past a damaged checkpoint), and they
    # are overwritten when the run gets there.
    step = step_of(final)
    older = [p for p in checkpoint_dirs(final.parent) if step_of(p) <= step]
    for old in older[:-keep_last] if keep_last > 0 else []:
        _remove(old)
    return final


def step_of(ckpt: Path) -> int:
    """``checkpoint-000300`` → 300."""
    return int(_NAME.fullmatch(ckpt.name).group(1))


def _set_aside(folder: Path) -> Path:
    """Rename out of the checkpoint namespace, so that a kill mid-delete leaves no half checkpoint."""
    doomed = folder.with_name(f".deleting-{folder.name}")
    shutil.rmtree(doomed, ignore_errors=True)
    folder.rename(doomed)
    return doomed


def _remove(folder: Path) -> None:
    shutil.rmtree(_set_aside(folder))


def write_trainer_state(
    tmp: Path,
    step: int,
    rank_states: list[dict],
    param_groups: list,
    config: Config,
    task: dict | None = None,
) -> None:
    """``rng.safetensors``, ``trainer_state.json``, ``config.yaml`` and ``task.json`` of a checkpoint being written."""
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
        "data_start": rank_states[0].get("start", 0),  # the global sample order (grpo.run.stream)
        "data_done": rank_states[0].get("done", []),
        "weight_checksums": [rs["checksum"] for rs in rank_states],
        "param_groups": param_groups,
        "python_rng": _python_rng_to_json(random.getstate()),
        "numpy_rng": [np_state[0], int(np_state[2]), int(np_state[3]), float(np_state[4])],
    }
    (tmp / "trainer_state.json").write_text(json.dumps(state, indent=1))
    save_config(config, tmp / "config.yaml")
    if task is not None:
        write_task(tmp, **task)


# ------------------------------------------------------------------------------- resuming


def load_trainer_state(ckpt: str | Path, optimizer: torch.optim.Optimizer, rank: int = 0) -> dict:
    """Restore the optimizer and the RNGs of process ``rank`` from ``ckpt``; return the trainer state."""
    ckpt = Path(ckpt)
    current = ckpt / "trainer_state.json"
    try:
        state = json.loads(current.read_text())
        current = ckpt / "optimizer.safetensors"
        tensors = load_file(current)
        optimizer.load_state_dict(_unflatten_optimizer(tensors, state["param_groups"]))
    except (*LOAD_ERRORS, UnicodeDecodeError, RuntimeError) as e:
        raise CheckpointError(f"cannot resume from {current}: {reason(e)}") from e
    restore_rngs(ckpt, state, rank)
    return state


def restore_rngs(ckpt: Path, state: dict, rank: int) -> None:
    """Set torch's (CPU, CUDA) RNGs of process ``rank``, numpy's and python's from ``ckpt``."""
    current = ckpt / "rng.safetensors"
    try:
        rng = load_file(current)
        if rank < len(state["data_positions"]):  # a rank the writing run did not have keeps its seed
            torch.set_rng_state(rng[f"torch.{rank}"])
            if torch.cuda.is_available() and f"cuda.{rank}" in rng:
                torch.cuda.set_rng_state(rng[f"cuda.{rank}"])
        current = ckpt / "trainer_state.json"
        name, pos, has_gauss, cached = state["numpy_rng"]
        np.random.set_state((name, rng["numpy_keys"].numpy().astype(np.uint32), pos, has_gauss, cached))
        random.setstate(_python_rng_from_json(state["python_rng"]))
        int(state["step"]), list(state["data_positions"])
    except (*LOAD_ERRORS, UnicodeDecodeError, RuntimeError) as e:
        raise CheckpointError(f"cannot resume from {current}: {reason(e)}") from e


def resolve_resume(resume: str, output_dir: str | Path, say: bool = True) -> Path | None:
    """The checkpoint to resume from, verified (``verify_checkpoint``), or None to start afresh.

    ``auto`` → the newest checkpoint of the run that verifies; newer ones that do not are
    skipped, and the reason is printed. If there are checkpoints but none verifies, that is an
    error (starting afresh would silently throw the run away). A path → that checkpoint, which
    must verify.
    """
    if not resume:
        return None
    if resume != "auto":
        path = Path(resume)
        if not path.is_dir():
            raise CheckpointError(f"train.resume={resume}: checkpoint folder not found")
        verify_checkpoint(path, need_trainer_state=True)
        return path
    skipped = []
    for ckpt in reversed(checkpoint_dirs(output_dir)):
        try:
            verify_checkpoint(ckpt, need_trainer_state=True)
        except CheckpointError as e:
            skipped.append(f"{ckpt.name} ({e})")
            continue
        note = f"; skipped newer {'; '.join(skipped)}" if skipped else ""
        if say:  # False on every rank but rank 0 of a distributed run
            print(f"resuming from {ckpt}{note}", file=sys.stderr)
        return ckpt
    if skipped:
        raise CheckpointError(
            f"no intact checkpoint in {output_dir} to resume from: {'; '.join(skipped)}. "
            "Move them away (or set train.resume=) to start afresh"
        )
    return None


def trim_logs(out_dir: str | Path, step: int) -> None:
    """On resume, keep only log lines of steps up to ``step`` (later ones will be run again).

    A partial last line (a crash in the middle of an append) or any other line that is not a
    JSON object with a ``step`` is dropped, and a message says how many. The file is rewritten
    under a temporary name and renamed, so a kill here loses nothing.
    """
    for name in ("metrics.jsonl", "completions.jsonl"):
        path = Path(out_dir) / name
        if not path.exists():
            continue
        kept, bad, later = [], 0, 0
        for line in path.read_bytes().splitlines(keepends=True):
            try:
                row = json.loads(line) if line.endswith(b"\n") else None
                row_step = row["step"] if isinstance(row, dict) else None
            except (json.JSONDecodeError, UnicodeDecodeError, KeyError, TypeError):
                row_step = None
            if not isinstance(row_step, int):
                bad += 1
            elif row_step <= step:
                kept.append(line)
            else:
                later += 1
        if bad:
            print(
                f"{path}: dropped {bad} partial or unreadable line(s) (a crash during an append)",
                file=sys.stderr,
            )
        if bad or later:
            tmp = path.with_name(f".{name}.tmp")
            tmp.write_bytes(b"".join(kept))
            os.replace(tmp, path)


def log_step(out: Path, metrics: dict, buf, n_completions: int) -> None:
    """Append the step's metrics to ``metrics.jsonl`` and its first ``n_completions`` completions
    (of the ``grpo.rollout.RolloutBuffer``) with their rewards to ``completions.jsonl``."""
    if not out.is_dir():  # deleted or unmounted under the run: say so, rather than name a log file
        raise FileNotFoundError(2, "the output folder no longer exists", str(out))
    with open(out / "metrics.jsonl", "a") as fh:
        fh.write(json.dumps(metrics) + "\n")
    prompt_rows_N = buf.prompt_rows_N.tolist()
    with open(out / "completions.jsonl", "a") as fh:
        for n in range(min(n_completions, buf.num_completions)):
            sample = buf.samples[prompt_rows_N[n]]
            row = {"step": metrics["step"], "sample_id": sample.sample_id, "target": sample.target,
                   "text": buf.texts[n], "reward": float(buf.rewards_N[n]),
                   **{k: float(v[n]) for k, v in buf.components.items()}}  # fmt: skip
            fh.write(json.dumps(row) + "\n")


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
