"""The rating scale a judge is prompted with, and its default scoring method: ``python -m
eval.evaluate``, ``eval.rank``, ``PreferenceScorer`` and ``eval.serve`` work them out here, in one way.

The scale given on the command line (``--scale LO-HI`` or a comma list) wins; else the scale the
model was trained on (the ``task.json`` of a checkpoint written by ``grpo.train``); else the
caller's fallback (the configured ``data.rating_min``–``rating_max``, or ImageRewardDB's 1–7). It
is never read from the evaluation data, so one bad row cannot change it.
"""

from __future__ import annotations

import sys
from pathlib import Path

from common.manifest import read_task, saved_scale


def parse_scale(text: str) -> tuple[int, ...]:
    """``"1-7"`` → (1, …, 7); ``"1,3,5,7"`` → (1, 3, 5, 7). Ratings must be single digits."""
    try:
        if "-" in text:
            lo, hi = (int(x) for x in text.split("-"))
            values = tuple(range(lo, hi + 1))
        else:
            values = tuple(sorted({int(x) for x in text.split(",")}))
    except ValueError:
        raise ValueError(f"--scale {text!r}: expected LO-HI (e.g. 1-7) or a comma list") from None
    if len(values) < 2 or not all(0 <= v <= 9 for v in values):
        raise ValueError(f"--scale {text!r}: need at least two single-digit ratings")
    return values


def rating_scale(
    model: object, given: tuple[int, ...] | None, fallback: tuple[int, ...] | None, fallback_source: str
) -> tuple[tuple[int, ...] | None, str]:
    """The scale to prompt ``model`` (a folder, a hub id, or an already loaded model) with, and
    where it came from: ``given``, else the trained one, else ``fallback``. A note on stderr says
    when ``given`` differs from the scale the model was trained on."""
    saved, source = saved_scale(str(model)) if isinstance(model, (str, Path)) else (None, "")
    if given:
        if saved and tuple(given) != saved:
            print(f"note: --scale {given} differs from the scale the model was trained on, {saved} "
                  f"({source})", file=sys.stderr)  # fmt: skip
        return tuple(given), "--scale"
    if saved:
        return saved, source
    return fallback, fallback_source


def checkpoint_method(model: object) -> str:
    """The default scoring method of a judge: ``anchor`` for a checkpoint trained on pairs (its
    ``task.json``), else ``rating`` (a rating checkpoint, a hub id, a model without a task record)."""
    folder = Path(model) if isinstance(model, (str, Path)) else None
    info = read_task(folder) if folder is not None and folder.is_dir() else None
    return "anchor" if info and info["task"] == "pair" else "rating"
