"""What a dataset reader returns, and how it reports the rows it had to skip.

``data.imagereward`` and ``data.hpdv2`` return a ``TrainSet`` (training prompts) or an
``EvalSet`` (per-prompt groups for the official metrics). Bulk reading never stops at a bad
row: a row with a missing image file, an empty prompt, a malformed field or a rank
list whose length differs from its image list is skipped, logged with its file and row
(``skip_row``), and counted in ``skipped`` (reason → count); the reader ends with a one-line
summary (``log_summary``). Images are not decoded while reading: an undecodable image raises
``data.images.BadImageError`` when it is loaded, and the consumer skips and counts it.

What else a row must pass, with the reason it is counted under:

- **text**: the prompt is a non-empty string the tokenizer can encode (``empty prompt``,
  ``prompt not valid UTF-8``: a lone surrogate, or invalid UTF-8 bytes in the file, which are
  read with ``surrogateescape`` so that only the rows holding them are lost); prompts longer than
  ``data.max_prompt_tokens`` tokens are dropped by ``drop_long_prompts`` once the tokenizer is
  loaded (``prompt too long``), so a 100,000-character prompt never reaches the model;
- **image paths** stay inside the dataset folder (``image path outside the dataset folder``):
  absolute paths and ``..`` that climb out are refused, checked on the path as written (a
  symlink the user placed inside the folder is followed, that is their choice);
- **duplicates** of an earlier row (the same image, the same pair) are dropped (``duplicate row``).

A file that cannot be parsed at all (not JSON, not parquet, a truncated zip) is a
``common.errors.DataError`` naming the file, or, for one zip among many, skipped and counted.
"""

from __future__ import annotations

import json
import logging
import math
import os
from collections import Counter
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path

from common.errors import DataError, one_line
from data.types import EvalGroup, TrainSample

logger = logging.getLogger(__name__)

MAX_LOGGED_PER_REASON = 10  # a 50K-row file with one systematic fault must not flood the log


@dataclass
class TrainSet:
    """Training prompts of one dataset split.

    ``rating_values`` is the rating scale of the ``"rating"`` task (e.g. ``(1, …, 7)``), ``None``
    for the ``"pair"`` task. ``skipped`` counts the rows left out, by reason.
    """

    samples: list[TrainSample]
    rating_values: tuple[int, ...] | None
    skipped: Counter = field(default_factory=Counter)


@dataclass
class EvalSet:
    """Evaluation groups (all images of one prompt with human rank levels) and the skip counts."""

    groups: list[EvalGroup]
    skipped: Counter = field(default_factory=Counter)


def skip_row(skipped: Counter, reason: str, where: str, detail: str = "") -> None:
    """Count one skipped row under ``reason`` and log it (the first few per reason)."""
    skipped[reason] += 1
    n = skipped[reason]
    if n <= MAX_LOGGED_PER_REASON:
        logger.warning("skipped %s: %s%s", where, reason, f" ({detail})" if detail else "")
    if n == MAX_LOGGED_PER_REASON:
        logger.warning("further rows skipped for %r are counted but not logged", reason)


def log_summary(what: str, kept: int, unit: str, skipped: Counter) -> None:
    """One line at the end of a read: how much was kept and what was skipped, by reason."""
    if skipped:
        reasons = ", ".join(f"{reason}: {n}" for reason, n in sorted(skipped.items()))
        logger.warning("%s: %d %s, skipped %d (%s)", what, kept, unit, sum(skipped.values()), reasons)
    else:
        logger.info("%s: %d %s, none skipped", what, kept, unit)


def prompt_problem(prompt: object) -> str | None:
    """Why ``prompt`` cannot be used (the skip reason), or None if it can."""
    if not isinstance(prompt, str) or not prompt.strip():
        return "empty prompt"
    try:
        prompt.encode("utf-8")  # a lone surrogate (or an undecodable byte read with surrogateescape)
    except UnicodeEncodeError:
        return "prompt not valid UTF-8"
    return None


def rating_problem(value: object, scale: tuple[int, ...]) -> str | None:
    """Why ``value`` is not a rating on ``scale`` (the skip reason), or None if it is one."""
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "rating missing or NaN"
    if as_int(value) is None:
        return "rating not an integer"
    if as_int(value) not in scale:
        return "rating outside the scale"
    return None


def inside_root(root: str | Path, path: str) -> str | None:
    """``root/path`` normalised, or None if it lies outside ``root`` (``..`` climbing out, or an
    absolute path elsewhere; an absolute path inside ``root`` is fine).

    Checked on the path as written (``os.path.abspath``), not after following symlinks: a
    dataset whose image folder is a symlink to another disk is still read.
    """
    if not path or "\0" in path:
        return None
    base = os.path.abspath(str(root))
    joined = os.path.abspath(os.path.join(base, path))
    if joined != base and not joined.startswith(base.rstrip(os.sep) + os.sep):
        return None
    return os.path.normpath(os.path.join(str(root), path))


def drop_long_prompts(items: list, tokenizer, max_tokens: int, skipped: Counter, what: str) -> list:
    """The items (anything with a ``.prompt``) whose prompt is at most ``max_tokens`` tokens.

    The rest are counted under ``prompt too long`` (and those the tokenizer cannot encode under
    ``prompt not valid UTF-8``). ``max_tokens <= 0`` keeps everything. Prompts repeat (an
    ImageRewardDB prompt has 4–9 images), so each distinct text is tokenized once.
    """
    if max_tokens <= 0:
        return list(items)
    lengths: dict[str, int | None] = {}
    kept = []
    for item in items:
        prompt = item.prompt
        if prompt not in lengths:
            try:
                lengths[prompt] = len(tokenizer.encode(prompt, add_special_tokens=False))
            except (UnicodeError, TypeError, ValueError):  # tokenizers raises these for unencodable text
                lengths[prompt] = None
        n = lengths[prompt]
        name = getattr(item, "sample_id", None) or getattr(item, "group_id", "?")
        if n is None:
            skip_row(skipped, "prompt not valid UTF-8", f"{what} {name}")
        elif n > max_tokens:
            skip_row(
                skipped,
                "prompt too long",
                f"{what} {name}",
                f"{n} tokens > data.max_prompt_tokens={max_tokens}",
            )
        else:
            kept.append(item)
    return kept


def first_occurrences(keys: Iterable, skipped: Counter, where: list[str]) -> list[bool]:
    """For each key, whether it is the first of its kind; later ones are counted as ``duplicate row``."""
    seen: dict = {}
    keep = []
    for key, w in zip(keys, where):
        if key in seen:
            skip_row(skipped, "duplicate row", w, f"same as {seen[key]}")
            keep.append(False)
        else:
            seen[key] = w
            keep.append(True)
    return keep


def as_int(value: object) -> int | None:
    """An integer field (an int, or an integral float as JSON and pandas write them), else None."""
    if isinstance(value, bool):
        return None
    if isinstance(value, int):
        return value
    if isinstance(value, float) and value.is_integer():
        return int(value)
    return None


def as_number(value: object) -> float | None:
    """A finite number (HPDv2's averaged ranks are floats), else None."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return None
    return float(value) if value == value and abs(value) != float("inf") else None


def parse_json(text: str | bytes, where: str) -> list:
    """A JSON list of rows; a file that is not valid JSON or not a list fails loudly, naming itself.

    Bytes that are not valid UTF-8 do not fail the file: they are decoded with
    ``surrogateescape``, so the strings that hold them carry lone surrogates, and the rows with
    such a prompt are skipped and counted by the reader (``prompt_problem``).
    """
    try:
        try:
            rows = json.loads(text)
        except UnicodeDecodeError as e:
            logger.warning("%s is not valid UTF-8 (%s): rows with undecodable text will be skipped", where, e)
            rows = json.loads(text.decode("utf-8", "surrogateescape"))
    except (json.JSONDecodeError, UnicodeDecodeError, RecursionError) as e:
        raise DataError(f"{where} is not valid JSON: {one_line(e)}") from e
    if not isinstance(rows, list):
        raise DataError(f"{where} is not a JSON list of rows (got {type(rows).__name__})")
    return rows


def read_parquet_rows(path: Path) -> list[dict]:
    """The rows of a parquet file as dicts; a file pyarrow cannot read is a ``DataError`` naming it.

    String columns are read as bytes and decoded here with ``surrogateescape``, so invalid UTF-8
    in one row becomes a lone surrogate that the reader skips, not a ``UnicodeDecodeError``.
    """
    import pyarrow as pa
    import pyarrow.parquet as pq

    try:
        table = pq.read_table(path)
        text_columns = []
        for i, f in enumerate(table.schema):
            if pa.types.is_string(f.type) or pa.types.is_large_string(f.type):
                binary = pa.large_binary() if pa.types.is_large_string(f.type) else pa.binary()
                table = table.set_column(i, f.name, table.column(i).cast(binary))
                text_columns.append(f.name)
        rows = table.to_pylist()
    except (pa.ArrowException, OSError, ValueError) as e:
        raise DataError(f"{path} is not a readable parquet file: {one_line(e)}") from e
    for row in rows:
        for key in text_columns:
            if isinstance(row[key], bytes):
                row[key] = row[key].decode("utf-8", "surrogateescape")
    return rows
