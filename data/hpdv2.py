"""Reader for a local HPDv2 folder (HF ``ymhao/HPDv2``), as published (docs/data-and-metrics.md).

Layout::

    ROOT/train.json   [{"prompt", "file_path" | "image_path": [2 paths], "human_preference": [1,0] | [0,1]}, ...]
    ROOT/test.json    [{"prompt", "image_path": [9 paths], "rank": [levels, lower = better],
                        "raw_annotations": [{"rank", "user_hash"}, ...]}, ...]
    ROOT/train/ ROOT/test/   the images (after extracting the published archives)

**Image paths** in the json are relative to ``ROOT/train/`` resp. ``ROOT/test/`` (HPSv2's own
loaders join them onto the image folder, e.g. ``"00000.jpg"``). A path that already starts
with the folder (``"test/00000.jpg"``) resolves against ``ROOT`` instead. Whichever of
``ROOT/{split}/path`` and ``ROOT/path`` exists is taken, in that order. A path that leaves
``ROOT`` (absolute, or ``..`` climbing out) is never opened: its row is skipped and counted.

**Duplicates**: a train pair that repeats an earlier one (same prompt, same two images, same
preferred image, in either order) is dropped and counted; a test prompt that lists an image
twice keeps it once, and a test prompt repeating an earlier one (same text, same images) is
dropped. Pairs with the same images but the *opposite* preference are kept: that is human
disagreement, which the data is meant to hold.

**Training subset** (arXiv 2503.19948 trains on a random 25% of the pairs): each row ``i`` gets
a key ``blake2b(f"{seed}:{i}")``; the ``round(fraction · n)`` rows with the smallest keys are
taken, kept in file order. Hashes rather than an RNG make the subset identical on every machine
and every numpy version, and its size exact.

**Pair order** is shuffled per sample from another hash bit, with the label flipped to match,
so the answer "1" is right for about half the samples whatever order the file stores. The
target is 1 when the second image *shown* is the preferred one (``human_preference`` marks the
preferred image with 1).
"""

from __future__ import annotations

import hashlib
import os
from collections import Counter
from collections.abc import Callable
from pathlib import Path

from common.errors import DataError
from data.sets import (
    EvalSet,
    TrainSet,
    as_int,
    as_number,
    first_occurrences,
    inside_root,
    log_summary,
    parse_json,
    prompt_problem,
    skip_row,
)
from data.types import EvalGroup, ImageRef, TrainSample


def read_train(root: str | Path, fraction: float = 0.25, seed: int = 0) -> TrainSet:
    """A seeded ``fraction`` of the train pairs as ``"pair"`` samples (target 1 = second image better)."""
    if not 0.0 < fraction <= 1.0:
        raise DataError(f"fraction must be in (0, 1], got {fraction}")
    root = Path(root)
    path = root / "train.json"
    rows = parse_json(path.read_bytes(), str(path))
    chosen = sorted(
        sorted(range(len(rows)), key=lambda i: _hash(seed, i, "subset"))[: round(fraction * len(rows))]
    )
    skipped: Counter = Counter()
    samples, resolve, pair_keys, wheres = [], _resolver(root, "train"), [], []
    for i in chosen:
        row, where = rows[i], f"{path} row {i}"
        if not isinstance(row, dict):
            skip_row(skipped, "malformed row", where, "not an object")
            continue
        paths = row.get("file_path", row.get("image_path"))
        pref = row.get("human_preference")
        if (
            not _is_str_list(paths, 2)
            or not isinstance(pref, list)
            or [as_int(p) for p in pref] not in ([1, 0], [0, 1])
        ):
            skip_row(
                skipped, "malformed row", where, "need 2 image paths and human_preference [1,0] or [0,1]"
            )
            continue
        prompt = row.get("prompt")
        problem = prompt_problem(prompt)
        if problem is not None:
            skip_row(skipped, problem, where)
            continue
        if any(inside_root(root, p) is None for p in paths):
            skip_row(skipped, "image path outside the dataset folder", where, ", ".join(map(repr, paths)))
            continue
        refs = [resolve(p) for p in paths]
        if None in refs:
            missing = [p for p, r in zip(paths, refs) if r is None]
            skip_row(skipped, "missing image", where, ", ".join(missing))
            continue
        second_preferred = as_int(pref[1]) == 1
        pair_keys.append(
            (prompt, frozenset(refs), refs[int(second_preferred)])
        )  # order-free, with the winner
        wheres.append(where)
        if _hash(seed, i, "flip") & 1:  # show the pair the other way round; the label follows
            refs, second_preferred = refs[::-1], not second_preferred
        samples.append(TrainSample(f"hpdv2-train-{i}", prompt, tuple(refs), int(second_preferred), "pair"))
    keep = first_occurrences(pair_keys, skipped, wheres)
    samples = [s for s, k in zip(samples, keep) if k]
    if not samples:
        raise DataError(f"no usable pairs in {path}: skipped {dict(skipped)}")
    log_summary(
        f"HPDv2 train {root} ({len(chosen)} of {len(rows)} pairs drawn)", len(samples), "pairs", skipped
    )
    return TrainSet(samples, None, skipped)


def read_eval(root: str | Path) -> EvalSet:
    """The test prompts: 9 images each with their averaged human rank (lower = better)."""
    root = Path(root)
    path = root / "test.json"
    rows = parse_json(path.read_bytes(), str(path))
    skipped: Counter = Counter()
    groups, resolve = [], _resolver(root, "test")
    for i, row in enumerate(rows):
        where = f"{path} row {i}"
        paths, rank = (row.get("image_path"), row.get("rank")) if isinstance(row, dict) else (None, None)
        if not _is_str_list(paths) or not isinstance(rank, list):
            skip_row(skipped, "malformed row", where, "image_path and rank lists are required")
            continue
        if len(paths) != len(rank):
            skip_row(skipped, "rank/image length mismatch", where, f"{len(rank)} ranks, {len(paths)} images")
            continue
        ranks = [as_number(r) for r in rank]
        if any(r is None for r in ranks):
            skip_row(skipped, "malformed row", where, f"non-numeric rank {rank}")
            continue
        prompt = row.get("prompt")
        problem = prompt_problem(prompt)
        if problem is not None:
            skip_row(skipped, problem, where)
            continue
        refs, kept = [], []
        for p, r in zip(paths, ranks):
            ref = resolve(p) if inside_root(root, p) is not None else None
            if inside_root(root, p) is None:
                skip_row(skipped, "image path outside the dataset folder", where, repr(p))
            elif ref is None:
                skip_row(skipped, "missing image", where, p)
            elif ref in refs:
                skip_row(skipped, "duplicate row", where, f"{p} listed twice")
            else:
                refs.append(ref)
                kept.append(r)
        if len(refs) < 2:
            skip_row(skipped, "fewer than 2 usable images", where)
            continue
        groups.append(EvalGroup(f"hpdv2-test-{i}", prompt, tuple(refs), tuple(kept)))
    keep = first_occurrences([(g.prompt, frozenset(g.images)) for g in groups], skipped,
                             [f"{path} row {g.group_id.rsplit('-', 1)[1]}" for g in groups])  # fmt: skip
    groups = [g for g, k in zip(groups, keep) if k]
    if not groups:
        raise DataError(f"no usable prompts in {path}: skipped {dict(skipped)}")
    log_summary(f"HPDv2 test {root}", len(groups), "prompts", skipped)
    return EvalSet(groups, skipped)


def _hash(seed: int, i: int, purpose: str) -> int:
    """A 64-bit integer fixed by (seed, row, purpose): the same on every machine."""
    digest = hashlib.blake2b(f"{seed}:{i}:{purpose}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little")


def _is_str_list(value: object, n: int | None = None) -> bool:
    ok = isinstance(value, list) and all(isinstance(v, str) and v for v in value)
    return ok and (n is None or len(value) == n)


def _resolver(root: Path, folder: str) -> Callable[[str], ImageRef | None]:
    """``path -> ImageRef | None``: ``ROOT/folder/path`` if it exists, else ``ROOT/path``.

    Plain ``os.path`` strings and a cache: HPDv2 has ~800K pairs, and an image appears in several.
    """
    base, sub, cache = str(root), os.path.join(str(root), folder), {}

    def resolve(path: str) -> ImageRef | None:
        if path not in cache:
            found = [c for c in (os.path.join(sub, path), os.path.join(base, path)) if os.path.isfile(c)]
            cache[path] = ImageRef(found[0]) if found else None
        return cache[path]

    return resolve
