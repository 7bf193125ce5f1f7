"""Reader for a local ImageRewardDB folder (HF ``THUDM/ImageRewardDB``), as published
(docs/data-and-metrics.md).

Layout (one row per image)::

    ROOT/metadata-{train,validation,test}.parquet      columns: image_path, prompt_id, prompt,
                                                        classification, image_amount_in_total, rank,
                                                        overall_rating, image_text_alignment_rating,
                                                        fidelity_rating
    ROOT/images/{split}/{split}_{i}.zip                 lossless .webp images + {split}_{i}.json
                                                        (the same rows, without the parquet)

- **Metadata** comes from ``metadata-{split}.parquet`` when present (one cheap columnar read),
  otherwise from the ``{split}_{i}.json`` inside each zip. Nothing is decoded while reading.
- **Images are read straight out of the zips**: ``ImageRef(path=zip, member=name)``, never
  extracted. ``image_path`` ``images/train/train_7/<uuid>.webp`` names zip ``train_7.zip``; the
  member is matched by file name, so a zip holding ``<uuid>.webp`` or ``train_7/<uuid>.webp``
  both work. If the zip is absent but ``ROOT/image_path`` exists (an extracted copy), that file
  is used. The existence check costs one zip directory read per zip, no decoding.
- **Subsets** 1k/2k/4k/8k are the first 4·k train zips (250 prompts each); ``None`` = all.
- **THUDM/ImageReward's GitHub test set** is read by ``read_eval`` too: ``ROOT/{split}.json``, a
  list of ``{"id", "prompt", "generations": [paths], "ranking": [levels]}``, with the image paths
  relative to ``ROOT/{split}_images/`` (as in that repo's ``scripts/test.sh``) or to ``ROOT``.

``read_train`` gives one ``"rating"`` sample per image (target = the rating); ``read_eval`` one
group per ``prompt_id`` with the human ``rank`` of each image (1 = best, ties allowed).

**The rating scale is configured, never read from the data**: ``RATING_SCALE``
(1–7, ImageRewardDB's ``overall_rating``) unless the caller passes another. A row rated outside
it, NaN or fractional is skipped and counted, so one bad row cannot turn the 1–7 task into 1–8.
Rows are also skipped and counted for an ``image_path`` that leaves ``ROOT``, a prompt that is
not valid text, and a repeat of an earlier image (see ``data.sets``).
"""

from __future__ import annotations

import logging
import posixpath
import re
import zipfile
import zlib
from collections import Counter
from collections.abc import Iterator
from pathlib import Path

from common.errors import DataError, one_line
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
    rating_problem,
    read_parquet_rows,
    skip_row,
)
from data.types import EvalGroup, ImageRef, TrainSample

logger = logging.getLogger(__name__)

SUBSET_PARTS = {"1k": 4, "2k": 8, "4k": 16, "8k": 32}  # subset -> number of leading train zips
RATING_SCALE = tuple(range(1, 8))  # overall_rating (and the other two rating columns): 1 worst … 7 best
ZIP_ERRORS = (OSError, EOFError, zipfile.BadZipFile, zlib.error, KeyError)  # a damaged or truncated zip
Row = tuple[str, dict, ImageRef]  # (where, row, image): "where" names file and row for messages


def read_train(
    root: str | Path,
    split: str = "train",
    subset: str | None = None,
    rating_field: str = "overall_rating",
    rating_values: tuple[int, ...] = RATING_SCALE,
) -> TrainSet:
    """One ``"rating"`` sample per image of ``split``: the image, its prompt, target = its rating.

    ``rating_values`` is the scale the model answers on (default ``RATING_SCALE``, 1–7); rows
    whose ``rating_field`` is outside it, NaN or fractional are skipped and counted. Ratings must
    be single digits 0–9: the soft head reads one answer token per rating.
    """
    root = Path(root)
    rating_values = tuple(sorted(set(rating_values)))
    _check_scale(rating_values, rating_field, root)
    skipped: Counter = Counter()
    samples = []
    for where, row, ref in _hf_rows(root, split, subset, skipped):
        value = row.get(rating_field)
        problem = rating_problem(value, rating_values)
        if problem is not None:
            scale = f"{rating_field} {value!r}, scale {rating_values[0]}-{rating_values[-1]}"
            skip_row(skipped, problem, where, scale)
            continue
        samples.append(TrainSample(row["image_path"], row["prompt"], (ref,), as_int(value), "rating"))
    if not samples:
        raise DataError(f"no usable rows in ImageRewardDB {split} under {root}: skipped {dict(skipped)}")
    log_summary(f"ImageRewardDB {split} (train view) {root}", len(samples), "images", skipped)
    return TrainSet(samples, rating_values, skipped)


def read_eval(
    root: str | Path, split: str = "test", rating_field: str = "", rating_values: tuple[int, ...] = ()
) -> EvalSet:
    """One group per prompt: its images and their human rank levels (lower = better).

    A rank must be a positive integer (a NaN, fractional or non-positive rank skips its row); an
    image listed twice for one prompt is kept once. With ``rating_field`` and ``rating_values``
    (ImageRewardDB's own layout), a row whose rating is outside the scale, NaN or fractional is
    skipped and counted as in training: it is a damaged row.
    """
    root = Path(root)
    skipped: Counter = Counter()
    if _has_hf_layout(root, split) or not (root / f"{split}.json").is_file():
        groups = _hf_groups(root, split, skipped, rating_field, tuple(rating_values))
    else:
        groups = _github_groups(root, split, skipped)
    small = [g for g in groups if len(g.images) < 2]
    for g in small:
        skip_row(skipped, "fewer than 2 usable images", f"prompt {g.group_id}")
    groups = [g for g in groups if len(g.images) >= 2]
    if not groups:
        raise DataError(f"no usable prompts in ImageRewardDB {split} under {root}: skipped {dict(skipped)}")
    log_summary(f"ImageRewardDB {split} (eval view) {root}", len(groups), "prompts", skipped)
    return EvalSet(groups, skipped)


def _check_scale(values: tuple[int, ...], field: str, root: Path) -> None:
    """The soft head reads one token per rating, so every rating must be one digit."""
    if not values or not all(isinstance(v, int) and 0 <= v <= 9 for v in values):
        raise DataError(
            f"rating scale {values} of {field!r} in {root} is not single digits 0-9; the soft head "
            "reads one answer token per rating, so pass rating_values within 0..9 or rescale the ratings"
        )


def _has_hf_layout(root: Path, split: str) -> bool:
    return (root / f"metadata-{split}.parquet").is_file() or (root / "images" / split).is_dir()


def _hf_groups(
    root: Path, split: str, skipped: Counter, rating_field: str, rating_values: tuple[int, ...]
) -> list[EvalGroup]:
    """Group the per-image rows by ``prompt_id``, in order of first appearance; with a rating scale,
    each image's human rating too (``EvalGroup.ratings``)."""
    by_prompt: dict[str, tuple[str, list[ImageRef], list[float], list[str], list[float]]] = {}
    rated = bool(rating_field and rating_values)
    for where, row, ref in _hf_rows(root, split, None, skipped):
        if rated:
            problem = rating_problem(row.get(rating_field), rating_values)
            if problem is not None:
                skip_row(skipped, problem, where, f"{rating_field} {row.get(rating_field)!r}")
                continue
        rank, prompt_id = as_int(row.get("rank")), row.get("prompt_id")
        if rank is None or rank < 1 or not isinstance(prompt_id, str):
            skip_row(skipped, "malformed row", where, f"a positive integer rank and a prompt_id are required, "
                     f"got rank {row.get('rank')!r}")  # fmt: skip
            continue
        _, refs, ranks, wheres, ratings = by_prompt.setdefault(prompt_id, (row["prompt"], [], [], [], []))
        if ref in refs:
            skip_row(skipped, "duplicate row", where, f"same image as {wheres[refs.index(ref)]}")
            continue
        refs.append(ref)
        ranks.append(float(rank))
        wheres.append(where)
        if rated:
            ratings.append(float(row[rating_field]))
    return [EvalGroup(pid, p, tuple(refs), tuple(ranks), tuple(ratings)) for pid, (p, refs, ranks, _, ratings)
            in by_prompt.items()]  # fmt: skip


def _hf_rows(root: Path, split: str, subset: str | None, skipped: Counter) -> list[Row]:
    """Every well-formed row of ``split`` whose image exists, with a lazy reference to it."""
    if subset is not None:
        if split != "train":
            raise ValueError(f"subset={subset!r} applies to the train split only, not {split!r}")
        if subset not in SUBSET_PARTS:
            raise ValueError(f"unknown subset {subset!r}; expected one of {sorted(SUBSET_PARTS)} or None")
    max_part = SUBSET_PARTS[subset] if subset else None
    images = _ZipImages(root, split)
    out = []
    for where, row, part in _metadata_rows(root, split, skipped):
        if not isinstance(row, dict) or not isinstance(row.get("image_path"), str):
            skip_row(skipped, "malformed row", where, "not an object with an image_path")
            continue
        part = part if part is not None else _part_of(row["image_path"], split)
        if part is None:
            skip_row(
                skipped, "malformed row", where, f"image_path {row['image_path']!r} names no {split}_N folder"
            )
            continue
        if max_part is not None and part > max_part:
            continue  # outside the subset: not a skip, just not selected
        problem = prompt_problem(row.get("prompt"))
        if problem is not None:
            skip_row(skipped, problem, where)
            continue
        if inside_root(root, row["image_path"]) is None:
            skip_row(skipped, "image path outside the dataset folder", where, repr(row["image_path"]))
            continue
        ref = images.ref(row["image_path"], part)
        if ref is None:
            skip_row(skipped, "missing image", where, row["image_path"])
            continue
        out.append((where, row, ref))
    # One row per image and prompt: a repeated row would be trained and scored twice.
    keep = first_occurrences([(ref, row["prompt"]) for _, row, ref in out], skipped, [w for w, _, _ in out])
    return [r for r, k in zip(out, keep) if k]


def _metadata_rows(root: Path, split: str, skipped: Counter) -> Iterator[tuple[str, object, int | None]]:
    """Yield ``(where, row, part)`` from the parquet file, or else from the json in each zip.

    A zip that cannot be opened or whose json is damaged is skipped and counted
    (``unreadable zip``), as its images would be; a parquet file that cannot be read is an error.
    """
    parquet = root / f"metadata-{split}.parquet"
    if parquet.is_file():
        for i, row in enumerate(read_parquet_rows(parquet)):
            yield f"{parquet} row {i}", row, None
        return
    zips = _zips(root, split)
    if not zips:
        raise FileNotFoundError(
            f"no ImageRewardDB {split} split under {root}: expected {parquet.name} or images/{split}/{split}_N.zip"
        )
    for part, zip_path in zips:
        name = f"{split}_{part}.json"
        try:
            with zipfile.ZipFile(zip_path) as zf:
                members = [m for m in zf.namelist() if posixpath.basename(m) == name]
                if not members:
                    raise DataError(f"{zip_path} holds no {name}: not an ImageRewardDB zip")
                rows = parse_json(zf.read(members[0]), f"{zip_path}::{members[0]}")
        except (*ZIP_ERRORS, DataError) as e:
            skip_row(skipped, "unreadable zip", str(zip_path), one_line(f"{type(e).__name__}: {e}"))
            continue
        for i, row in enumerate(rows):
            yield f"{zip_path}::{members[0]} row {i}", row, part


def _zips(root: Path, split: str) -> list[tuple[int, Path]]:
    """The ``{split}_N.zip`` files of a split, sorted by N."""
    found = []
    for p in (root / "images" / split).glob(f"{split}_*.zip"):
        m = re.fullmatch(rf"{re.escape(split)}_(\d+)\.zip", p.name)
        if m:
            found.append((int(m.group(1)), p))
    return sorted(found)


def _part_of(image_path: str, split: str) -> int | None:
    """``images/train/train_7/x.webp`` -> 7."""
    m = re.search(rf"(?:^|/){re.escape(split)}_(\d+)/[^/]+$", image_path)
    return int(m.group(1)) if m else None


class _ZipImages:
    """Resolves ``image_path`` to a zip member (or an extracted file) without decoding anything."""

    def __init__(self, root: Path, split: str) -> None:
        self.root, self.split = root, split
        self._index: dict[int, tuple[Path, dict[str, str]] | None] = {}

    def ref(self, image_path: str, part: int) -> ImageRef | None:
        if part not in self._index:
            self._index[part] = self._read_index(part)
        entry = self._index[part]
        name = posixpath.basename(image_path)
        if entry is not None and name in entry[1]:
            return ImageRef(str(entry[0]), entry[1][name])
        extracted = inside_root(self.root, image_path)
        return ImageRef(extracted) if extracted is not None and Path(extracted).is_file() else None

    def _read_index(self, part: int) -> tuple[Path, dict[str, str]] | None:
        zip_path = self.root / "images" / self.split / f"{self.split}_{part}.zip"
        if not zip_path.is_file():
            return None
        try:
            with zipfile.ZipFile(zip_path) as zf:
                names = zf.namelist()
        except ZIP_ERRORS as e:
            logger.warning("unreadable zip %s (%s): its images count as missing", zip_path, e)
            return None
        return zip_path, {posixpath.basename(n): n for n in names if not n.endswith("/")}


def _github_groups(root: Path, split: str, skipped: Counter) -> list[EvalGroup]:
    """THUDM/ImageReward ``data/test.json``: one row per prompt, images in ``{split}_images/``."""
    path = root / f"{split}.json"
    rows = parse_json(path.read_bytes(), str(path))
    image_dir = root / f"{split}_images" if (root / f"{split}_images").is_dir() else root
    groups = []
    for i, row in enumerate(rows):
        where = f"{path} row {i}"
        gens, ranking = (
            (row.get("generations"), row.get("ranking")) if isinstance(row, dict) else (None, None)
        )
        if (
            not isinstance(gens, list)
            or not isinstance(ranking, list)
            or not all(isinstance(g, str) for g in gens)
        ):
            skip_row(skipped, "malformed row", where, "generations and ranking lists are required")
            continue
        if len(gens) != len(ranking):
            skip_row(
                skipped, "rank/image length mismatch", where, f"{len(ranking)} ranks, {len(gens)} images"
            )
            continue
        ranks = [as_number(r) for r in ranking]
        if any(r is None for r in ranks):
            skip_row(skipped, "malformed row", where, f"non-numeric ranking {ranking}")
            continue
        problem = prompt_problem(row.get("prompt"))
        if problem is not None:
            skip_row(skipped, problem, where)
            continue
        refs, kept = [], []
        for g, r in zip(gens, ranks):
            path = inside_root(image_dir, g)
            if path is None:
                skip_row(skipped, "image path outside the dataset folder", where, repr(g))
            elif not Path(path).is_file():
                skip_row(skipped, "missing image", where, path)
            elif ImageRef(path) in refs:
                skip_row(skipped, "duplicate row", where, f"{g} listed twice")
            else:
                refs.append(ImageRef(path))
                kept.append(r)
        groups.append(EvalGroup(str(row.get("id", i)), row["prompt"], tuple(refs), tuple(kept)))
    keep = first_occurrences(
        [(g.prompt, g.images) for g in groups], skipped, [f"{path} prompt {g.group_id}" for g in groups]
    )
    return [g for g, k in zip(groups, keep) if k]
