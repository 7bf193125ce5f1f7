"""A checkpoint as a plain Hugging Face folder: ``python -m grpo.export CHECKPOINT OUT [--dtype bfloat16]``.

A sharded checkpoint of an FSDP run (``grpo.run.sharded_checkpoint``) holds each rank's shards of
the weights; its ``consolidate_weights`` reads them all in one process (no GPU, no process group)
and writes the consolidated weights with ``save_pretrained`` (safetensors, split into ≤ 5 GB files
with an index, config and generation config), plus the processor
(``models.qwen_vl.save_processor``). The folder loads with ``models.qwen_vl.load_policy``,
``eval.evaluate``, ``eval.rank`` and plain transformers. An unsharded checkpoint (DDP or one
process) already is such a folder; it is copied as weights + config + processor. Memory: one copy
of the model in the chosen dtype on the CPU (7B in float32: 33 GB; ``--dtype bfloat16`` halves it
and the folder).
"""

from __future__ import annotations

import argparse
import shutil
import sys
from pathlib import Path

import torch

from common.errors import CheckpointError, user_errors_exit
from common.manifest import check_model_source, load_errors_as_checkpoint_error
from grpo.run.sharded_checkpoint import consolidate_weights, is_sharded_checkpoint
from models.qwen_vl import load_policy, load_processor, save_processor


def export(ckpt: str | Path, out: str | Path, dtype: torch.dtype | None = None) -> Path:
    """``ckpt`` (sharded or not) → a Hugging Face folder at ``out`` with weights, config and processor."""

    ckpt, out = Path(ckpt), Path(out)
    if not (ckpt / "config.json").is_file():
        raise CheckpointError(f"{ckpt}: no config.json; expected a checkpoint folder of grpo.train")
    out.mkdir(parents=True, exist_ok=True)
    if is_sharded_checkpoint(ckpt):
        consolidate_weights(ckpt, out, dtype)
    else:
        model, _ = load_policy(str(ckpt), dtype=dtype or torch.float32)
        model.save_pretrained(out, safe_serialization=True)
    save_processor(load_processor(str(ckpt)), out)
    for name in ("config.yaml",):  # the run's resolved config, for the record
        if (ckpt / name).exists():
            shutil.copy(ckpt / name, out / name)
    return out


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], epilog=__doc__.split("\n\n", 1)[1])
    parser.add_argument("checkpoint", help="a checkpoint folder of grpo.train (sharded or not)")
    parser.add_argument("out", help="the Hugging Face folder to write")
    parser.add_argument("--dtype", choices=("float32", "bfloat16"), default="float32",
                        help="dtype of the written weights (default float32: the master weights, exact)")  # fmt: skip
    args = parser.parse_args(argv)
    with user_errors_exit():
        check_model_source(args.checkpoint)
        with load_errors_as_checkpoint_error(args.checkpoint):
            out = export(args.checkpoint, args.out, getattr(torch, args.dtype))
    print(f"wrote {out}")


if __name__ == "__main__":
    sys.exit(main())
