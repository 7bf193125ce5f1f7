"""Is a model or checkpoint folder whole? Manifests, checks, and the task a model was trained for.

Light on purpose (no torch): the commands check their inputs here before loading anything slow.

- ``manifest.json`` (written last into every checkpoint by ``grpo.run.checkpoint``): the size and
  sha256 of every other file. ``verify_checkpoint`` compares them; a folder without a manifest
  (a downloaded model, the tiny model, a cold-started model) is checked by parsing every
  safetensors header and JSON/YAML file instead. Either way a problem is one
  ``CheckpointError`` line naming the file.
- ``check_model_source``: a model argument that looks like a local path but is not there is
  "not found", not a hub error about repo ids; ``load_errors_as_checkpoint_error`` turns any
  error while loading into one line.
- ``task.json``: the task (rating | pair) and the rating scale the model answers on, so that
  evaluation and ranking prompt it with the scale it was trained on (``saved_scale``).
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import yaml
from safetensors import SafetensorError, safe_open

from common.errors import CheckpointError, one_line

MANIFEST = "manifest.json"
TASK_FILE = "task.json"
TRAINER_FILES = ("trainer_state.json", "optimizer.safetensors", "rng.safetensors", "config.yaml")
RESUME_ONLY = ("optimizer.safetensors", "rng.safetensors")  # read by a resume, never by a model load
LOAD_ERRORS = (
    OSError,
    ValueError,
    KeyError,
    TypeError,
    SafetensorError,
    json.JSONDecodeError,
    yaml.YAMLError,
)


def reason(e: BaseException) -> str:
    """One line saying what went wrong: the OS's words for an ``OSError``, else type and message."""
    if isinstance(e, OSError) and e.strerror:
        return f"{e.strerror}" + (f" ({e.filename})" if e.filename else "")
    return one_line(f"{type(e).__name__}: {e}")


def write_task(
    folder: str | Path, task: str, rating_values: tuple[int, ...] | None, rating_field: str = ""
) -> None:
    """``task.json``: the task the model was trained for and the rating scale it answers on."""
    info = {"task": task, "rating_values": list(rating_values) if rating_values else None,
            "rating_field": rating_field}  # fmt: skip
    (Path(folder) / TASK_FILE).write_text(json.dumps(info) + "\n")


def read_task(folder: str | Path) -> dict | None:
    """The ``task.json`` of a model folder (None if it has none, e.g. a hub model)."""
    path = Path(folder) / TASK_FILE
    if not path.is_file():
        return None
    try:
        info = json.loads(path.read_text())
        values = info["rating_values"]
        ok = info["task"] in ("rating", "pair") and (
            values is None
            or (isinstance(values, list) and all(isinstance(v, int) and 0 <= v <= 9 for v in values))
        )
    except (*LOAD_ERRORS, UnicodeDecodeError) as e:
        raise CheckpointError(f"{path} is damaged: {reason(e)}") from e
    if not ok:
        raise CheckpointError(
            f"{path} is damaged: expected a task (rating|pair) and single-digit rating_values"
        )
    info["rating_values"] = tuple(values) if values else None
    return info


# ---------------------------------------------------------------------- manifest and checks


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def _files(folder: Path) -> list[Path]:
    return sorted(p for p in folder.rglob("*") if p.is_file() and p.name != MANIFEST)


def _sha256_all(paths: list[Path]) -> list[str]:
    """The sha256 of each file, several files at a time (hashlib releases the GIL on big buffers).

    Measured here: ~180 MB/s per core without SHA extensions, so a 7B full-fine-tuning checkpoint
    (~15 GB of bf16 weights, ~60 GB of Adam moments) costs minutes per save and per resume on
    such a CPU, well under a minute with SHA-NI; the optimizer, one file, sets the floor.
    """
    with ThreadPoolExecutor(max_workers=max(1, min(8, os.cpu_count() or 1, len(paths)))) as pool:
        return list(pool.map(_sha256, paths))


def write_manifest(folder: str | Path) -> None:
    """``manifest.json``: the size and sha256 of every file of ``folder``, written last."""
    folder = Path(folder)
    paths = _files(folder)
    files = {
        str(p.relative_to(folder)): {"size": p.stat().st_size, "sha256": digest}
        for p, digest in zip(paths, _sha256_all(paths))
    }
    tmp = folder / f".{MANIFEST}.tmp"
    with open(tmp, "w") as fh:
        fh.write(json.dumps({"format": 1, "files": files}, indent=1) + "\n")
        fh.flush()
        os.fsync(fh.fileno())
    tmp.rename(folder / MANIFEST)


def verify_checkpoint(folder: str | Path, need_trainer_state: bool = False) -> int:
    """Check a model or checkpoint folder; return the number of files checked.

    With a ``manifest.json``: every file it lists exists with its size and sha256. Without one
    (a downloaded model, a cold-started model, a checkpoint from before manifests): every
    ``*.safetensors`` header and every ``*.json`` / ``*.yaml`` file parses. ``need_trainer_state``
    also requires the files a resume reads; without it (loading a model to evaluate it) the
    optimizer and RNG files are checked by size only, not hashed: at 7B scale the optimizer alone
    is ~60 GB, and evaluation never reads it. Raises ``CheckpointError`` naming the file.
    """
    folder = Path(folder)
    if not folder.is_dir():
        raise CheckpointError(f"checkpoint folder {folder} not found")
    manifest = folder / MANIFEST
    if need_trainer_state:
        sharded = (folder / "optimizer_shards").is_dir()  # an FSDP checkpoint (grpo.run.sharded_checkpoint)
        for name in TRAINER_FILES:
            if sharded and name == "optimizer.safetensors":
                continue
            if not (folder / name).is_file():
                raise CheckpointError(f"{folder / name} is missing: the checkpoint is incomplete")
    if not manifest.is_file():
        return _check_parses(folder)
    try:
        files = json.loads(manifest.read_text())["files"]
        listed = {str(name): (int(f["size"]), str(f["sha256"])) for name, f in files.items()}
    except (*LOAD_ERRORS, UnicodeDecodeError, AttributeError) as e:
        raise CheckpointError(f"{manifest} is damaged: {reason(e)}") from e
    for name, (size, _) in listed.items():
        path = folder / name
        if not path.is_file():
            raise CheckpointError(f"{path} is missing (listed in {MANIFEST})")
        actual = path.stat().st_size
        if actual != size:
            raise CheckpointError(f"{path} is truncated or altered: {actual} bytes, {MANIFEST} says {size}")
    names = [
        n for n in listed if need_trainer_state or not (n in RESUME_ONLY or n.startswith("optimizer_shards/"))
    ]
    for name, digest in zip(names, _sha256_all([folder / n for n in names])):
        if digest != listed[name][1]:
            raise CheckpointError(f"{folder / name} is corrupt: its sha256 differs from {MANIFEST}")
    return len(listed)


def _check_parses(folder: Path) -> int:
    """A folder without a manifest: every safetensors header and JSON/YAML file must parse."""
    n = 0
    for path in _files(folder):
        try:
            if path.suffix == ".safetensors":
                with safe_open(str(path), framework="pt") as fh:
                    fh.keys()
            elif path.suffix == ".json":
                json.loads(path.read_bytes())
            elif path.suffix in (".yaml", ".yml"):
                yaml.safe_load(path.read_bytes())
            else:
                continue
        except (*LOAD_ERRORS, UnicodeDecodeError) as e:
            raise CheckpointError(f"{path} is damaged: {reason(e)}") from e
        n += 1
    return n


def check_model_source(name_or_path: str) -> None:
    """Fail with one line before loading if ``name_or_path`` is a local folder that is missing or damaged.

    A string is taken as a local path if it exists, starts with ``/``, ``.`` or ``~``, has more
    than one ``/``, or its first component is an existing folder (``runs/x``); anything else
    (``Qwen/Qwen2.5-VL-7B-Instruct``) is left to the hub.
    """
    path = Path(name_or_path).expanduser()
    first = Path(name_or_path.split("/", 1)[0])
    looks_local = (
        path.exists()
        or name_or_path.startswith(("/", ".", "~"))
        or name_or_path.count("/") > 1
        or ("/" in name_or_path and first.is_dir())
    )
    if not looks_local:
        return
    if not path.is_dir():
        raise CheckpointError(f"model folder {name_or_path} not found")
    if not (path / "config.json").is_file() and not (path / "adapter_config.json").is_file():
        raise CheckpointError(f"{path} is not a model folder: it has no config.json (or adapter_config.json)")
    verify_checkpoint(path)


@contextlib.contextmanager
def load_errors_as_checkpoint_error(name_or_path: str) -> Iterator[None]:
    """Any error while loading the model from ``name_or_path`` becomes one ``CheckpointError`` line."""
    try:
        yield
    except CheckpointError:
        raise
    except (*LOAD_ERRORS, RuntimeError) as e:
        raise CheckpointError(f"cannot load the model {name_or_path}: {reason(e)}") from e


def saved_scale(name_or_path: str) -> tuple[tuple[int, ...] | None, str]:
    """The rating scale in the ``task.json`` of a local model folder, and where it came from."""
    path = Path(name_or_path)
    info = read_task(path) if path.is_dir() else None
    if info is None or not info["rating_values"]:
        return None, ""
    return info["rating_values"], str(path / TASK_FILE)


def task_record(train_set, rating_field: str) -> dict:
    """What ``task.json`` records for a training set (``data.sets.TrainSet``)."""
    task = train_set.samples[0].task
    return {"task": task, "rating_values": train_set.rating_values,
            "rating_field": rating_field if task == "rating" else ""}  # fmt: skip


def check_same_task(ckpt: Path | None, train_set) -> None:
    """A resume must not change the task or the rating scale the checkpoint was trained on."""
    info = read_task(ckpt) if ckpt is not None else None
    if info is None:
        return
    task = train_set.samples[0].task
    if (info["task"], info["rating_values"]) != (task, train_set.rating_values):
        raise CheckpointError(
            f"{ckpt} was trained for task {info['task']} on scale {info['rating_values']}; this config "
            f"asks for {task} on {train_set.rating_values} (data.rating_min/rating_max)"
        )
