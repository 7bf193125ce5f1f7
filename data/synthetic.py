"""Small synthetic datasets in exactly the published ImageRewardDB and HPDv2 layouts.

    python -m data.synthetic OUT --kind imagereward|hpdv2 [--prompts N] [--seed S] [--task colour|prompt] [--size PX]

The machines this project is tested on cannot download the real data, so tests and the CPU demo read these
folders with the very readers that read the real ones. Every image shows one filled shape
(circle, square or triangle) of one of four colours on white, with jitter in position, size,
rotation and shade. A hidden quality function, fixed by the seed, sets the labels:

- **task "colour"** (the image-only tier; the default): the colour alone sets the quality through
  ``colour_mapping(seed)``, a seeded permutation of the colours onto the ratings {1, 3, 5, 7}.
  The prompt ("a red circle on a white background") names a random colour and shape and is
  irrelevant. The tiny model learns this tier (docs/facts.md).
- **task "prompt"** (prompt-conditioned): quality = 1 + 3·[drawn colour = the prompt's colour]
  + 2·[drawn shape = the prompt's shape] + 1·[no defect], in 1…7; a defect is Gaussian pixel
  noise or blur (a quarter of the images each). Half the images match the prompt's colour, half
  its shape. Only larger models learn this tier.

Label noise: an ImageReward rating moves ±1 (clipped to 1…7) with probability 0.1, and the
per-prompt ``rank`` is the dense rank of the noisy ratings (1 = best, ties share a level). In
the colour tier all three rating columns equal the overall rating; in the prompt tier
``image_text_alignment_rating`` = 1 + 3·colour match + 3·shape match and ``fidelity_rating`` = 7
without a defect, else 3. An HPDv2 train pair holds two images of different quality; the
better one is marked preferred, except with probability 0.1. An HPDv2 test prompt has 9 images,
ranked by three simulated annotators (quality plus N(0, 1) noise); ``rank`` is their mean.

Sizes: ``prompts`` train prompts, and max(8, prompts // 4) validation (ImageRewardDB only) and
test prompts; ImageRewardDB has 4–9 images per prompt and ``prompts_per_zip`` prompts per zip
(250 in the real data). HPDv2 has 2 pairs per train prompt; rows alternate the path key
``image_path`` / ``file_path`` so readers meet both. ``OUT/synthetic.json`` records the mapping,
task, seed and counts. The same seed gives byte-identical files (fixed zip timestamps).
"""

from __future__ import annotations

import argparse
import io
import json
import shutil
import uuid
import zipfile
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
from PIL import Image, ImageDraw, ImageFilter

from common.errors import user_errors_exit

COLOURS = {"red": (220, 40, 40), "yellow": (235, 200, 30), "green": (40, 160, 70), "blue": (40, 90, 220)}
SHAPES = ("circle", "square", "triangle")
RATING_LEVELS = (1, 3, 5, 7)
LABEL_NOISE = 0.1
TASKS = ("colour", "prompt")
_ZIP_TIME = (1980, 1, 1, 0, 0, 0)  # the earliest a zip can store: no wall clock in the bytes
_OUTPUTS = ("images", "train", "test", "train.json", "test.json", "synthetic.json") + tuple(
    f"metadata-{s}.parquet" for s in ("train", "validation", "test")
)


def colour_mapping(seed: int) -> dict[str, int]:
    """The colour → rating map of the colour tier: a permutation of {1, 3, 5, 7} drawn from ``seed``."""
    perm = np.random.default_rng([seed, 1]).permutation(len(RATING_LEVELS))
    return {c: RATING_LEVELS[j] for c, j in zip(COLOURS, perm)}


def _new_prompt(rng: np.random.Generator) -> tuple[str, str, str]:
    colour, shape = str(rng.choice(list(COLOURS))), str(rng.choice(SHAPES))
    return f"a {colour} {shape} on a white background", colour, shape


def _new_image(rng: np.random.Generator, task: str, colour: str, shape: str, mapping: dict) -> dict:
    """Draw the hidden attributes of one image and its clean quality (see the module doc)."""
    if task == "colour":
        spec = {"colour": str(rng.choice(list(COLOURS))), "shape": str(rng.choice(SHAPES)), "defect": "none"}
        spec["quality"] = mapping[spec["colour"]]
        return spec
    c = colour if rng.random() < 0.5 else str(rng.choice([k for k in COLOURS if k != colour]))
    s = shape if rng.random() < 0.5 else str(rng.choice([k for k in SHAPES if k != shape]))
    defect = str(rng.choice(["none", "none", "noise", "blur"]))
    quality = 1 + 3 * (c == colour) + 2 * (s == shape) + (defect == "none")
    return {
        "colour": c,
        "shape": s,
        "defect": defect,
        "quality": quality,
        "cm": c == colour,
        "sm": s == shape,
    }


def _draw(spec: dict, size: int, rng: np.random.Generator) -> Image.Image:
    """One jittered filled shape on white, with the spec's defect applied."""
    im = Image.new("RGB", (size, size), (255, 255, 255))
    fill = tuple(int(np.clip(v + rng.integers(-12, 13), 0, 255)) for v in COLOURS[spec["colour"]])
    cx, cy = size * (0.5 + rng.uniform(-0.12, 0.12, size=2))
    r = size * rng.uniform(0.22, 0.34)
    angle = rng.uniform(-0.3, 0.3)  # radians
    draw = ImageDraw.Draw(im)
    if spec["shape"] == "circle":
        rx, ry = r * rng.uniform(0.85, 1.15), r * rng.uniform(0.85, 1.15)
        draw.ellipse([cx - rx, cy - ry, cx + rx, cy + ry], fill=fill)
    else:
        n, phase = (4, np.pi / 4) if spec["shape"] == "square" else (3, -np.pi / 2)
        t = phase + angle + 2 * np.pi * np.arange(n) / n
        draw.polygon([(float(cx + r * np.cos(a)), float(cy + r * np.sin(a))) for a in t], fill=fill)
    if spec["defect"] == "blur":
        im = im.filter(ImageFilter.GaussianBlur(size / 16))
    elif spec["defect"] == "noise":
        a = np.asarray(im, dtype=np.float64) + rng.normal(0, 40, size=(size, size, 3))
        im = Image.fromarray(np.clip(a, 0, 255).astype(np.uint8))
    return im


def _noisy(rating: int, rng: np.random.Generator) -> int:
    if rng.random() < LABEL_NOISE:
        rating += 1 if rng.random() < 0.5 else -1
    return int(np.clip(rating, 1, 7))


def _dense_ranks(ratings: list[int]) -> list[int]:
    """Higher rating → better (smaller) rank; equal ratings share a level: [5, 7, 5, 1] → [2, 1, 2, 3]."""
    levels = sorted(set(ratings), reverse=True)
    return [levels.index(r) + 1 for r in ratings]


def _encode(im: Image.Image, fmt: str) -> bytes:
    buf = io.BytesIO()
    if fmt == "WEBP":
        im.save(buf, "WEBP", lossless=True, quality=0, method=0)  # lossless, fastest effort
    else:
        im.save(buf, fmt)
    return buf.getvalue()


def _zip_add(zf: zipfile.ZipFile, name: str, data: bytes) -> None:
    info = zipfile.ZipInfo(name, date_time=_ZIP_TIME)
    info.create_system, info.external_attr = 3, 0o644 << 16  # same bytes on every OS
    zf.writestr(info, data, compress_type=zipfile.ZIP_STORED)


def _prepare(out: Path) -> None:
    """Create ``out``; refuse a non-empty folder unless an earlier synthetic run wrote it."""
    if out.exists() and any(out.iterdir()):
        if not (out / "synthetic.json").is_file():
            raise FileExistsError(
                f"{out} is not empty and holds no synthetic.json: refusing to write into it"
            )
        for name in _OUTPUTS:
            p = out / name
            if p.is_dir():
                shutil.rmtree(p)
            else:
                p.unlink(missing_ok=True)
    out.mkdir(parents=True, exist_ok=True)


def _write_manifest(out: Path, kind: str, task: str, seed: int, size: int, counts: dict, **extra) -> dict:
    manifest = {
        "kind": kind,
        "task": task,
        "seed": seed,
        "size": size,
        "colour_mapping": colour_mapping(seed) if task == "colour" else None,
        "label_noise": LABEL_NOISE,
        "counts": counts,
        "quality": "see data/synthetic.py",
        **extra,
    }
    (out / "synthetic.json").write_text(json.dumps(manifest, indent=2) + "\n")
    return manifest


# The published metadata columns and dtypes (docs/data-and-metrics.md): strings, then int8 for the small ints.
IR_SCHEMA = pa.schema(
    [(c, pa.string()) for c in ("image_path", "prompt_id", "prompt", "classification")]
    + [
        (c, pa.int8())
        for c in (
            "image_amount_in_total",
            "rank",
            "overall_rating",
            "image_text_alignment_rating",
            "fidelity_rating",
        )
    ]
)


def _imagereward_prompt(
    rng: np.random.Generator, task: str, mapping: dict, size: int, part_dir: str, prompt_id: str
) -> list[tuple[str, bytes, dict]]:
    """One prompt's 4-9 images as (file name, lossless WebP bytes, metadata row)."""
    prompt, colour, shape = _new_prompt(rng)
    specs = [_new_image(rng, task, colour, shape, mapping) for _ in range(int(rng.integers(4, 10)))]
    ratings = [_noisy(s["quality"], rng) for s in specs]
    out = []
    for spec, rating, rank in zip(specs, ratings, _dense_ranks(ratings)):
        name = f"{uuid.UUID(bytes=rng.bytes(16), version=4)}.webp"
        align, fid = rating, rating
        if task == "prompt":
            align, fid = 1 + 3 * spec["cm"] + 3 * spec["sm"], (7 if spec["defect"] == "none" else 3)
        row = {
            "image_path": f"{part_dir}/{name}",
            "prompt_id": prompt_id,
            "prompt": prompt,
            "classification": "Shapes",
            "image_amount_in_total": len(specs),
            "rank": rank,
            "overall_rating": rating,
            "image_text_alignment_rating": align,
            "fidelity_rating": fid,
        }
        out.append((name, _encode(_draw(spec, size, rng), "WEBP"), row))
    return out


def write_imagereward(
    out: str | Path,
    prompts: int = 64,
    seed: int = 0,
    task: str = "colour",
    size: int = 64,
    prompts_per_zip: int = 25,
) -> dict:
    """Write an ImageRewardDB-layout folder (train / validation / test); returns the manifest.

    Zip ``images/{split}/{split}_{k}.zip`` holds ``{split}_{k}/<uuid>.webp`` and
    ``{split}_{k}/{split}_{k}.json``, so unzipping it in place yields each row's ``image_path``.
    """
    assert task in TASKS, f"task must be one of {TASKS}, got {task!r}"
    out = Path(out)
    _prepare(out)
    rng, mapping = np.random.default_rng([seed, 2]), colour_mapping(seed)
    counts, next_id = {}, 0
    n_eval = max(8, prompts // 4)
    for split, n_prompts in (("train", prompts), ("validation", n_eval), ("test", n_eval)):
        (out / "images" / split).mkdir(parents=True)
        rows, chunks = (
            [],
            [range(p0, min(p0 + prompts_per_zip, n_prompts)) for p0 in range(0, n_prompts, prompts_per_zip)],
        )
        for k, chunk in enumerate(chunks, start=1):
            part = f"{split}_{k}"
            part_rows = []
            with zipfile.ZipFile(out / "images" / split / f"{part}.zip", "w") as zf:
                for _ in chunk:
                    prompt_id = f"{next_id:06d}-{int(rng.integers(10000)):04d}"  # like "000864-0061"
                    next_id += 1
                    for name, data, row in _imagereward_prompt(
                        rng, task, mapping, size, f"images/{split}/{part}", prompt_id
                    ):
                        _zip_add(zf, f"{part}/{name}", data)
                        part_rows.append(row)
                _zip_add(zf, f"{part}/{part}.json", json.dumps(part_rows, indent=2).encode())
            rows += part_rows
        pq.write_table(pa.Table.from_pylist(rows, schema=IR_SCHEMA), out / f"metadata-{split}.parquet")
        counts[split] = {"prompts": n_prompts, "images": len(rows), "zips": len(chunks)}
    return _write_manifest(out, "imagereward", task, seed, size, counts)


def write_hpdv2(
    out: str | Path,
    prompts: int = 64,
    seed: int = 0,
    task: str = "colour",
    size: int = 64,
    draw_seed: int | None = None,
) -> dict:
    """Write an HPDv2-layout folder (train.json, test.json, train/, test/); returns the manifest.

    ``draw_seed`` (default ``seed``) draws the images and labels while ``seed`` keeps the hidden
    quality: a second folder with another ``draw_seed`` is a held-out set of the same preference
    (HPDv2 has no validation split). The manifest's ``test_quality`` holds the hidden quality of
    every test image, in ``test.json``'s order (the ceiling of a judge, for the demo).
    """
    assert task in TASKS, f"task must be one of {TASKS}, got {task!r}"
    out = Path(out)
    _prepare(out)
    rng, mapping = np.random.default_rng([seed if draw_seed is None else draw_seed, 3]), colour_mapping(seed)
    (out / "train").mkdir()
    (out / "test").mkdir()
    train, n_img = [], 0
    for _ in range(prompts):
        prompt, colour, shape = _new_prompt(rng)
        for _pair in range(2):
            a = _new_image(rng, task, colour, shape, mapping)
            b = _new_image(rng, task, colour, shape, mapping)
            while b["quality"] == a["quality"]:
                b = _new_image(rng, task, colour, shape, mapping)
            first_better = (a["quality"] > b["quality"]) != (rng.random() < LABEL_NOISE)
            paths = []
            for spec in (a, b):
                paths.append(f"{n_img:06d}.png")
                (out / "train" / paths[-1]).write_bytes(_encode(_draw(spec, size, rng), "PNG"))
                n_img += 1
            key = "image_path" if len(train) % 2 == 0 else "file_path"
            train.append(
                {"prompt": prompt, key: paths, "human_preference": [1, 0] if first_better else [0, 1]}
            )
    test, n_test, test_quality = [], max(8, prompts // 4), []
    for _ in range(n_test):
        prompt, colour, shape = _new_prompt(rng)
        specs = [_new_image(rng, task, colour, shape, mapping) for _ in range(9)]
        test_quality.append([s["quality"] for s in specs])
        paths = []
        for spec in specs:
            paths.append(f"{n_img:05d}.png")
            (out / "test" / paths[-1]).write_bytes(_encode(_draw(spec, size, rng), "PNG"))
            n_img += 1
        raw = []
        for _annotator in range(3):
            score = np.array([s["quality"] for s in specs]) + rng.normal(0, 1.0, size=9)
            order = np.argsort(-score, kind="stable")  # best first
            rank = np.empty(9, dtype=int)
            rank[order] = np.arange(1, 10)
            raw.append({"rank": rank.tolist(), "user_hash": rng.bytes(8).hex()})
        mean = np.mean([r["rank"] for r in raw], axis=0)
        test.append({"prompt": prompt, "image_path": paths, "rank": [round(float(m), 4) for m in mean],
                     "raw_annotations": raw})  # fmt: skip
    (out / "train.json").write_text(json.dumps(train, indent=2) + "\n")
    (out / "test.json").write_text(json.dumps(test, indent=2) + "\n")
    counts = {
        "train": {"prompts": prompts, "pairs": len(train)},
        "test": {"prompts": n_test, "images": 9 * n_test},
    }
    return _write_manifest(
        out, "hpdv2", task, seed, size, counts, draw_seed=draw_seed, test_quality=test_quality
    )


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(
        prog="python -m data.synthetic",
        description="Write a small synthetic ImageRewardDB or HPDv2 folder in the published layout.",
    )
    ap.add_argument(
        "out", type=Path, help="output folder (created; must be empty or an earlier synthetic run)"
    )
    ap.add_argument(
        "--kind", required=True, choices=("imagereward", "hpdv2"), help="which dataset layout to write"
    )
    ap.add_argument("--prompts", type=int, default=64, help="train prompts (test/validation: max(8, N//4))")
    ap.add_argument("--seed", type=int, default=0, help="fixes images, labels and the colour→rating mapping")
    ap.add_argument(
        "--task", choices=TASKS, default="colour", help="hidden quality: image-only or prompt-conditioned"
    )
    ap.add_argument("--size", type=int, default=64, help="image side in pixels")
    ap.add_argument("--prompts-per-zip", type=int, default=25, help="imagereward only (the real data: 250)")
    args = ap.parse_args(argv)
    if args.prompts < 1 or args.size < 8 or args.prompts_per_zip < 1:
        ap.error("--prompts and --prompts-per-zip must be >= 1 and --size >= 8")
    common = dict(prompts=args.prompts, seed=args.seed, task=args.task, size=args.size)
    with user_errors_exit():  # an occupied or unwritable folder, a full disk: one line, no traceback
        if args.kind == "imagereward":
            manifest = write_imagereward(args.out, prompts_per_zip=args.prompts_per_zip, **common)
        else:
            manifest = write_hpdv2(args.out, **common)
    print(f"wrote {args.kind} ({args.task}) to {args.out}: {json.dumps(manifest['counts'])}")


if __name__ == "__main__":
    main()
