"""What a dataset reader returns, and how it reports the rows it had to skip.

``data.imagereward`` and ``data.hpdv2`` return a ``TrainSet`` (training prompts) or an
``EvalSet`` (per-prompt groups for the official metrics). Bulk reading never stops at a bad
row (DESIGN §9): a row with a missing image file, an empty prompt, a malformed field or a rank
list whose length differs from its image list is skipped, logged with its file and row
(``skip_row``), and counted in ``skipped`` (reason → count); the reader ends with a one-line
summary (``log_summary``). Images are not decoded while reading: an undecodable image raises
``data.images.BadImageError`` when it is loaded, and the consumer skips and counts it.
"""

from __future__ import annotations

import json
import logging
from collections import Counter
from dataclasses import dataclass, field

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


def check_prompt(prompt: object) -> str | None:
    """The prompt text, or None if it is not a non-empty string."""
    if isinstance(prompt, str) and prompt.strip():
        return prompt
    return None


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
    """A JSON list of rows; a file that is not valid JSON or not a list fails loudly, naming itself."""
    try:
        rows = json.loads(text)
    except json.JSONDecodeError as e:
        raise ValueError(f"{where} is not valid JSON: {e}") from e
    if not isinstance(rows, list):
        raise ValueError(f"{where} is not a JSON list of rows (got {type(rows).__name__})")
    return rows
