"""Read a dataset by its kind (``data.kind``): ImageRewardDB or HPDv2, for training or evaluation.

The one place that turns the configuration's ``data`` section into a reader call, shared by the
train loop (``grpo.train``), the evaluation command (``eval.evaluate``) and the experiments.
``TRAIN_HELP`` and ``EVAL_HELP`` say what to download when the folder is missing.
"""

from __future__ import annotations

from pathlib import Path

from common.config import Config
from common.errors import DataError
from data.sets import EvalSet, TrainSet

TRAIN_HELP = {
    "imagereward": "download THUDM/ImageRewardDB (metadata-*.parquet and images/{train,validation,test}/*.zip) "
    "into that folder, e.g. `huggingface-cli download THUDM/ImageRewardDB --repo-type dataset --local-dir DIR`",
    "hpdv2": "download ymhao/HPDv2 (train.json, test.json and the train/ and test/ image folders) into that folder, "
    "e.g. `huggingface-cli download ymhao/HPDv2 --repo-type dataset --local-dir DIR` and extract the image archives",
}
EVAL_HELP = {
    "imagereward": "download the test split of THUDM/ImageRewardDB (metadata-test.parquet and images/test/*.zip) "
    "into that folder, e.g. `huggingface-cli download THUDM/ImageRewardDB --repo-type dataset --local-dir DIR "
    "--include 'metadata-*' 'images/test/*'`",
    "hpdv2": "download ymhao/HPDv2's test.json and test images (extract the test image archive into DIR/test/), "
    "e.g. `huggingface-cli download ymhao/HPDv2 --repo-type dataset --local-dir DIR`",
}


def read_train_set(cfg: Config) -> TrainSet:
    """The training samples of ``data.kind`` from ``data.root`` (the first ``data.max_samples`` if set)."""
    d = cfg.data
    if d.kind == "imagereward":
        from data.imagereward import read_train

        train_set = read_train(d.root, split=d.split, subset=d.subset or None, rating_field=d.rating_field,
                               rating_values=d.rating_values)  # fmt: skip
    else:
        from data.hpdv2 import read_train

        train_set = read_train(d.root, fraction=d.pair_fraction, seed=d.seed)
    if d.max_samples:
        train_set.samples = train_set.samples[: d.max_samples]
    if not train_set.samples:
        raise DataError(f"no usable training samples in {d.root} (skipped: {dict(train_set.skipped)})")
    return train_set


def read_eval_set(
    kind: str, root: str | Path, split: str, rating_field: str, rating_values: tuple[int, ...] | None
) -> EvalSet:
    """The evaluation groups of ``kind`` under ``root``. ImageRewardDB reads ``split``, and with a
    rating scale skips and counts the rows rated outside it, as training does; HPDv2 has one test set."""
    if kind == "imagereward":
        from data.imagereward import read_eval

        return read_eval(root, split=split, rating_field=rating_field, rating_values=rating_values or ())
    from data.hpdv2 import read_eval

    return read_eval(root)
