"""Reader for a local ImageRewardDB folder (HF ``THUDM/ImageRewardDB``), as published (DESIGN §6).

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
"""

from __future__ import annotations

import logging
import posixpath
import re
import zipfile
from collections import Counter
from collections.abc import Iterator
from pathlib import Path

import pyarrow.parquet as pq

from data.sets import EvalSet, TrainSet, as_int, as_number, check_prompt, log_summary, parse_json, skip_row
from data.types import EvalGroup, ImageRef, TrainSample

logger = logging.getLogger(__name__)

SUBSET_PARTS = {"1k": 4, "2k": 8, "4k": 16, "8k": 32}  # subset -> number of leading train zips
Row = tuple[str, dict, ImageRef]  # (where, row, image): "where" names file and row for messages


def read_train(
    root: str | Path,
    split: str = "train",
    subset: str | None = None,
    rating_field: str = "overall_rating",
    rating_values: tuple[int, ...] | None = None,
) -> TrainSet:
    """One ``"rating"`` sample per image of ``split``: the image, its prompt, target = its rating.

    ``rating_values`` (the scale the model answers on) defaults to the observed integer range
    ``min..max`` of ``rating_field``; pass it to fix the scale, and rows outside it are skipped.
    Ratings must be single digits 0–9: the soft head reads one answer token per rating.
    """
    root = Path(root)
    skipped: Counter = Counter()
    samples = []
    for where, row, ref in _hf_rows(root, split, subset, skipped):
        rating = as_int(row.get(rating_field))
        if rating is None:
            skip_row(skipped, f"missing {rating_field}", where, repr(row.get(rating_field)))
            continue
        samples.append(TrainSample(row["image_path"], row["prompt"], (ref,), rating, "rating"))
    if rating_values is None:
        ratings = [s.target for s in samples] or [0]
        rating_values = tuple(range(min(ratings), max(ratings) + 1))
        _check_scale(rating_values, rating_field, root)
    else:
        rating_values = tuple(sorted(set(rating_values)))
        _check_scale(rating_values, rating_field, root)
        outside = [s for s in samples if s.target not in rating_values]
        for s in outside:
            skip_row(
                skipped, "rating outside rating_values", s.sample_id, f"{s.target} not in {rating_values}"
            )
        samples = [s for s in samples if s.target in rating_values]
    if not samples:
        raise ValueError(f"no usable rows in ImageRewardDB {split} under {root}: skipped {dict(skipped)}")
    log_summary(f"ImageRewardDB {split} (train view) {root}", len(samples), "images", skipped)
    return TrainSet(samples, rating_values, skipped)


def read_eval(root: str | Path, split: str = "test") -> EvalSet:
    """One group per prompt: its images and their human rank levels (lower = better)."""
    root = Path(root)
    skipped: Counter = Counter()
    if _has_hf_layout(root, split) or not (root / f"{split}.json").is_file():
        groups = _hf_groups(root, split, skipped)
    else:
        groups = _github_groups(root, split, skipped)
    small = [g for g in groups if len(g.images) < 2]
    for g in small:
        skip_row(skipped, "fewer than 2 usable images", f"prompt {g.group_id}")
    groups = [g for g in groups if len(g.images) >= 2]
    if not groups:
        raise ValueError(f"no usable prompts in ImageRewardDB {split} under {root}: skipped {dict(skipped)}")
    log_summary(f"ImageRewardDB {split} (eval view) {root}", len(groups), "prompts", skipped)
    return EvalSet(groups, skipped)


def _check_scale(values: tuple[int, ...], field: str, root: Path) -> None:
    """The soft head reads one token per rating, so every rating must be one digit."""
    if not values or not all(isinstance(v, int) and 0 <= v <= 9 for v in values):
        raise ValueError(
            f"rating scale {values} of {field!r} in {root} is not single digits 0-9; the soft head "
            "reads one answer token per rating, so pass rating_values within 0..9 or rescale the ratings"
        )


def _has_hf_layout(root: Path, split: str) -> bool:
    return (root / f"metadata-{split}.parquet").is_file() or (root / "images" / split).is_dir()


def _hf_groups(root: Path, split: str, skipped: Counter) -> list[EvalGroup]:
    """Group the per-image rows by ``prompt_id``, in order of first appearance."""
    by_prompt: dict[str, tuple[str, list[ImageRef], list[float]]] = {}
    for where, row, ref in _hf_rows(root, split, None, skipped):
        rank, prompt_id = as_int(row.get("rank")), row.get("prompt_id")
        if rank is None or not isinstance(prompt_id, str):
            skip_row(skipped, "malformed row", where, "rank and prompt_id are required")
            continue
        _, refs, ranks = by_prompt.setdefault(prompt_id, (row["prompt"], [], []))
        refs.append(ref)
        ranks.append(float(rank))
    return [EvalGroup(pid, p, tuple(refs), tuple(ranks)) for pid, (p, refs, ranks) in by_prompt.items()]


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
    for where, row, part in _metadata_rows(root, split):
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
        if check_prompt(row.get("prompt")) is None:
            skip_row(skipped, "empty prompt", where)
            continue
        ref = images.ref(row["image_path"], part)
        if ref is None:
            skip_row(skipped, "missing image", where, row["image_path"])
            continue
        out.append((where, row, ref))
    return out


def _metadata_rows(root: Path, split: str) -> Iterator[tuple[str, object, int | None]]:
    """Yield ``(where, row, part)`` from the parquet file, or else from the json in each zip."""
    parquet = root / f"metadata-{split}.parquet"
    if parquet.is_file():
        table = pq.read_table(parquet)
        for i, row in enumerate(table.to_pylist()):
            yield f"{parquet} row {i}", row, None
        return
    zips = _zips(root, split)
    if not zips:
        raise FileNotFoundError(
            f"no ImageRewardDB {split} split under {root}: expected {parquet.name} or images/{split}/{split}_N.zip"
        )
    for part, zip_path in zips:
        name = f"{split}_{part}.json"
        with zipfile.ZipFile(zip_path) as zf:
            members = [m for m in zf.namelist() if posixpath.basename(m) == name]
            if not members:
                raise ValueError(f"{zip_path} holds no {name}: not an ImageRewardDB zip")
            rows = parse_json(zf.read(members[0]), f"{zip_path}::{members[0]}")
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
        extracted = self.root / image_path
        return ImageRef(str(extracted)) if extracted.is_file() else None

    def _read_index(self, part: int) -> tuple[Path, dict[str, str]] | None:
        zip_path = self.root / "images" / self.split / f"{self.split}_{part}.zip"
        if not zip_path.is_file():
            return None
        try:
            with zipfile.ZipFile(zip_path) as zf:
                names = zf.namelist()
        except (OSError, zipfile.BadZipFile) as e:
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
        prompt = check_prompt(row.get("prompt"))
        if prompt is None:
            skip_row(skipped, "empty prompt", where)
            continue
        refs, kept = [], []
        for g, r in zip(gens, ranks):
            if (image_dir / g).is_file():
                refs.append(ImageRef(str(image_dir / g)))
                kept.append(r)
            else:
                skip_row(skipped, "missing image", where, str(image_dir / g))
        groups.append(EvalGroup(str(row.get("id", i)), prompt, tuple(refs), tuple(kept)))
    return groups
