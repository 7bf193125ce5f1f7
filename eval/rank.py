"""Rank your own images for a prompt with a trained judge: ``python -m eval.rank --model PATH --prompt TEXT IMAGE...``.

    python -m eval.rank --model runs/ir/checkpoint-001000 --prompt "a red fox in snow" a.png b.png c.png
    python -m eval.rank --model runs/hpsv2/checkpoint-001000 --method anchor --k 3 --prompt "..." images/

Prints a table (rank, soft score, hard score, file, the start of the reasoning) best first; an
argument that is a folder stands for every image file in it. ``--json OUT`` also writes every
rollout's full text, ``--html OUT`` a self-contained page (thumbnails best first, scores, the
reasoning collapsed). An image that cannot be decoded is skipped with a one-line message; a file
given twice (by two names, or also through its folder) is ranked once, and the command says so.
The rating scale is the one the checkpoint was trained on (its ``task.json``) unless ``--scale``
says otherwise; a model folder that is missing or damaged, a prompt that is not valid text or
longer than ``--max-prompt-tokens`` is a one-line error.

``PreferenceScorer`` is the same thing as a Python reward function, e.g. for aligning a
diffusion model::

    scorer = PreferenceScorer("runs/ir/checkpoint-001000", method="rating", k=1)
    rewards = scorer.score("a red fox in snow", [pil_image_1, pil_image_2])   # soft scores, higher = better

Scores are the soft scores of ``eval.score`` (Mean@k): E[r|C] for ``rating``, p(image ≻ anchor)
for ``anchor`` (the anchor gets 0.5), Bradley–Terry log-strengths for ``round-robin``. Every
call is seeded with ``seed`` (and the anchor draw with the prompt), so the same prompt and
images always get the same scores; the caller's RNG state is restored afterwards.
"""

from __future__ import annotations

import argparse
import json
import sys
from dataclasses import dataclass
from pathlib import Path

from PIL import Image

from common.config import SamplingSpec
from common.errors import DataError, user_errors_exit
from common.manifest import check_model_source, load_errors_as_checkpoint_error
from data.imagereward import RATING_SCALE
from data.images import BadImageError, normalize_image
from data.sets import prompt_problem
from data.types import ImageRef
from eval.report_html import cards_of, page
from eval.scale import checkpoint_method, parse_scale, rating_scale
from eval.score import METHODS, GroupResult, ScoringSpec, image_reasoning, score_groups, seeded
from models.qwen_vl import (
    DEFAULT_MAX_PIXELS,
    image_token_count,
    load_policy,
    load_processor,
    set_pixel_bounds,
)

IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg", ".webp", ".bmp", ".gif", ".tif", ".tiff"}


@dataclass
class Ranked:
    """One image's scores, with the rollouts that produced them."""

    index: int
    soft: float
    hard: float
    reasoning: str  # the first rollout's reasoning about this image ("" for the anchor / round robin)


class PreferenceScorer:
    """A reasoning judge as a reward function: ``score(prompt, images) -> list[float]``.

    ``model`` is a checkpoint folder or hub id, or an already loaded ``(model, processor)``.
    ``method=None`` follows the task the checkpoint was trained for (``eval.scale.checkpoint_method``).
    Each request draws its rollouts from its own seed (``ScoringSpec.seed_per_request``), so a
    prompt's scores do not depend on ``batch_size`` or on what else is scored with it.
    ``max_pixels`` caps the image area as in ``load_model`` (None: the training cap).
    """

    def __init__(
        self,
        model: str | Path | tuple,
        method: str | None = None,
        k: int = 1,
        scale: tuple[int, ...] | None = None,
        max_new_tokens: int = SamplingSpec.max_new_tokens,
        temperature: float = SamplingSpec.temperature,
        seed: int = 0,
        batch_size: int = 16,
        debias: bool = False,
        dtype: str = "float32",
        device: str = "cpu",
        max_pixels: int | None = None,
    ) -> None:
        if scale is None:  # the scale the checkpoint was trained on, else ImageRewardDB's
            scale, _ = rating_scale(model, None, RATING_SCALE, "ImageRewardDB's 1-7")
        method = method or checkpoint_method(model)
        if isinstance(model, (str, Path)):
            model = load_model(str(model), dtype, device, max_pixels=max_pixels)
        self.model, self.processor = model
        self.model.eval()
        self.spec = ScoringSpec(method, tuple(scale) if method == "rating" else (), k, max_new_tokens,
                                temperature, batch_size, seed, debias, seed_per_request=True)  # fmt: skip

    def judge(self, prompt: str, images: list[Image.Image | str | Path]) -> GroupResult:
        """The full result for one prompt: image scores (``soft@…``, ``hard@…``) and every rollout.

        A path that cannot be decoded raises ``data.images.BadImageError`` naming the file.
        """
        if not images:
            raise ValueError("no images to score")
        decoded = [_as_image(im, i) for i, im in enumerate(images)]
        with seeded(self.spec.seed):
            (result,) = score_groups(self.model, self.processor, [(prompt, prompt, decoded)], self.spec)
        return result

    def rank(self, prompt: str, images: list[Image.Image | str | Path]) -> list[Ranked]:
        """The images best first (by Mean@k soft score; ties keep input order)."""
        result = self.judge(prompt, images)
        return ranked(result, self.spec)

    def score(self, prompt: str, images: list[Image.Image | str | Path]) -> list[float]:
        """Mean@k soft scores in input order (higher = better)."""
        return self.judge(prompt, images).scores[f"soft@{self.spec.k}"]


def load_model(
    name_or_path: str, dtype: str, device: str, min_pixels: int = 0, max_pixels: int | None = None
):
    """A judge for scoring: a full checkpoint, or a LoRA checkpoint folder (merged onto its base).

    ``max_pixels=None`` caps images as training does: a checkpoint trained here (``config.yaml``
    beside its weights) keeps the cap its processor was saved with; any other checkpoint, e.g. the
    base Qwen2.5-VL whose processor allows 16,384 tokens per image, is capped at
    ``DEFAULT_MAX_PIXELS`` (512 tokens). ``0`` keeps the processor's own bounds. A missing or
    damaged folder raises ``CheckpointError`` naming the file, before and while loading.
    """
    check_model_source(name_or_path)
    with load_errors_as_checkpoint_error(name_or_path):
        return _load_model(name_or_path, dtype, device, min_pixels, max_pixels)


def _load_model(name_or_path: str, dtype: str, device: str, min_pixels: int, max_pixels: int | None):
    folder = Path(name_or_path)
    if (folder / "adapter_config.json").is_file() and not (folder / "config.json").is_file():
        from peft import PeftModel  # only LoRA checkpoints need it

        base_name = json.loads((folder / "adapter_config.json").read_text())["base_model_name_or_path"]
        check_model_source(base_name)
        base, _ = load_policy(base_name, dtype=dtype, device=device)
        model = PeftModel.from_pretrained(base, str(folder)).merge_and_unload()
        processor = load_processor(str(folder))
    else:
        model, processor = load_policy(name_or_path, dtype=dtype, device=device)
    if max_pixels is None:
        trained_here = (folder / "config.yaml").is_file()
        own = processor.image_processor.size["longest_edge"]
        max_pixels = 0 if trained_here else min(own, DEFAULT_MAX_PIXELS)
    set_pixel_bounds(processor, min_pixels, max_pixels)
    return model.eval(), processor


def _as_image(im: Image.Image | str | Path, i: int) -> Image.Image:
    if isinstance(im, Image.Image):
        return normalize_image(im, source=f"image {i}")
    return ImageRef(str(im)).load()


def ranked(result: GroupResult, spec: ScoringSpec) -> list[Ranked]:
    """Per-image rows of a ``GroupResult``, best soft score first."""
    soft, hard = result.scores[f"soft@{spec.k}"], result.scores[f"hard@{spec.k}"]
    reasoning = image_reasoning(result, spec)
    rows = [Ranked(i, soft[i], hard[i], reasoning[i]) for i in range(result.n_images)]
    return sorted(rows, key=lambda r: -r.soft)


def expand_images(args: list[str]) -> list[Path]:
    """Files as given; a folder stands for its image files (by suffix), sorted by name."""
    paths = []
    for a in args:
        p = Path(a)
        if p.is_dir():
            found = sorted(f for f in p.iterdir() if f.is_file() and f.suffix.lower() in IMAGE_SUFFIXES)
            if not found:
                raise ValueError(f"{p}: no image files ({', '.join(sorted(IMAGE_SUFFIXES))})")
            paths += found
        else:
            paths.append(p)
    return paths


def shorten(text: str, width: int = 60) -> str:
    """One line of at most ``width`` characters."""
    line = " ".join("".join(c if c.isprintable() else " " for c in text).split())
    return line if len(line) <= width else line[: width - 1] + "…"


def format_table(rows: list[Ranked], names: list[str], anchor: int | None, tokens: list[int]) -> str:
    """The ranking, best first; ``tokens[i]`` is the image tokens image ``i`` cost."""
    header = f"{'rank':>4}  {'score':>8}  {'hard':>5}  {'tokens':>6}  {'file':<24}  reasoning"
    lines = [header, "-" * len(header)]
    for position, r in enumerate(rows, start=1):
        note = "(anchor)" if r.index == anchor else shorten(r.reasoning) or "—"
        name = (
            names[r.index] if len(names[r.index]) <= 24 else "…" + names[r.index][-23:]
        )  # keep the file name
        lines.append(
            f"{position:>4}  {r.soft:>8.4f}  {r.hard:>5.2f}  {tokens[r.index]:>6}  {name:<24}  {note}"
        )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        prog="python -m eval.rank",
        description=__doc__.split("\n\n")[0],
        epilog=__doc__.split("\n\n", 1)[1],
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("images", nargs="+", help="image files and/or folders of images")
    parser.add_argument("--model", required=True, help="checkpoint folder or hub id of a Qwen2.5-VL judge")
    parser.add_argument("--prompt", required=True, help="the text prompt the images were generated from")
    parser.add_argument(
        "--method",
        choices=METHODS,
        default=None,
        help="how to score (default: anchor for a checkpoint trained on pairs, else rating)",
    )
    parser.add_argument("--debias", action="store_true", help="pairwise: ask each comparison in both orders")
    parser.add_argument("--k", type=int, default=1, help="Mean@k: reasoning rollouts per question")
    parser.add_argument(
        "--scale", help="rating scale, LO-HI or a comma list (default: the checkpoint's, else 1-7)"
    )
    parser.add_argument(
        "--max-new-tokens", type=int, default=SamplingSpec.max_new_tokens, help="completion length limit"
    )
    parser.add_argument(
        "--temperature", type=float, default=SamplingSpec.temperature, help="sampling temperature"
    )
    parser.add_argument("--seed", type=int, default=0, help="seed of the rollouts and the anchor draw")
    parser.add_argument("--dtype", default="float32", choices=("float32", "bfloat16", "float16"))
    parser.add_argument("--device", default="cpu", help="cpu | cuda | cuda:N")
    parser.add_argument(
        "--max-pixels",
        type=int,
        default=None,
        help=f"cap on each image's area; default: the cap of a checkpoint trained here, else {DEFAULT_MAX_PIXELS:,} "
        "(512 image tokens, the training default); 0 keeps the processor's own",
    )
    parser.add_argument("--json", help="also write the scores and every rollout's text to this file")
    parser.add_argument(
        "--html", help="also write a self-contained page (thumbnails, scores, reasoning) to this file"
    )
    parser.add_argument(
        "--max-prompt-tokens", type=int, default=512, help="refuse longer prompts (0 = no limit)"
    )
    args = parser.parse_args(argv)
    with user_errors_exit():
        run(args, parser)


def once_each(paths: list[Path]) -> list[Path]:
    """The paths without repeats of the same file (two names for it, or a file also in a given
    folder); each repeat is reported on stderr."""
    seen: dict[tuple, Path] = {}
    out = []
    for p in paths:
        try:
            st = p.stat()
            key = (st.st_dev, st.st_ino)
        except OSError:  # missing: reported when it fails to load
            key = ("missing", str(p))
        if key in seen:
            print(f"note: {p} is the same file as {seen[key]}; ranked once", file=sys.stderr)
            continue
        seen[key] = p
        out.append(p)
    return out


def check_prompt_text(prompt: str, tokenizer, max_tokens: int) -> None:
    """``--prompt`` must be valid text within ``max_tokens`` tokens (a ``DataError`` otherwise)."""
    problem = prompt_problem(prompt)
    if problem is not None:
        raise DataError(f"--prompt: {problem}")
    n = len(tokenizer.encode(prompt, add_special_tokens=False))
    if max_tokens and n > max_tokens:
        raise DataError(f"--prompt is {n} tokens, more than --max-prompt-tokens={max_tokens}")


def run(args, parser) -> None:
    """The command's body (user errors become one line in ``main``)."""
    if prompt_problem(args.prompt) is not None:
        raise DataError(f"--prompt: {prompt_problem(args.prompt)}")
    try:
        scale, _ = rating_scale(args.model, parse_scale(args.scale) if args.scale else None, RATING_SCALE,
                                "ImageRewardDB's 1-7")  # fmt: skip
        paths = once_each(expand_images(args.images))
    except ValueError as e:
        parser.exit(2, f"error: {e}\n")
    images, names = [], []
    for p in paths:
        try:
            images.append(ImageRef(str(p)).load())
            names.append(str(p))
        except BadImageError as e:
            print(f"skipped {e}", file=sys.stderr)
    if not images:
        parser.exit(2, "error: no image could be decoded\n")

    scorer = PreferenceScorer(args.model, args.method, args.k, scale, args.max_new_tokens, args.temperature,
                              args.seed, debias=args.debias, dtype=args.dtype, device=args.device,
                              max_pixels=args.max_pixels)  # fmt: skip
    check_prompt_text(args.prompt, scorer.processor.tokenizer, args.max_prompt_tokens)
    result = scorer.judge(args.prompt, images)
    rows = ranked(result, scorer.spec)
    tokens = [image_token_count(scorer.processor, im) for im in images]
    print(format_table(rows, names, result.anchor, tokens))
    cap = scorer.processor.image_processor.size["longest_edge"]
    print(f"image tokens: {sum(tokens)} in all (images capped at {cap:,} pixels; --max-pixels changes it)")
    if args.json:
        out = {
            "prompt": args.prompt, "model": args.model, "method": scorer.spec.method, "debias": args.debias,
            "k": args.k, "seed": args.seed, "anchor": None if result.anchor is None else names[result.anchor],
            "max_pixels": cap,
            "ranking": [{"rank": n, "file": names[r.index], "soft": r.soft, "hard": r.hard,
                         "image_tokens": tokens[r.index]} for n, r in enumerate(rows, 1)],
            "requests": [{"files": [names[i] for i in idx], "texts": j.texts, "soft": j.soft, "hard": j.hard}
                         for idx, j in zip(result.requests, result.judgements)],
        }  # fmt: skip
        Path(args.json).write_text(json.dumps(out, indent=2) + "\n")
        print(f"wrote {args.json}")
    if args.html:
        facts = [("model", args.model), ("method", scorer.spec.method + (" (position-debiased)" if args.debias else "")),
                 ("rollouts per question (k)", str(args.k)), ("seed", str(args.seed))]  # fmt: skip
        cards = cards_of(result, args.k, images, [Path(n).name for n in names])
        Path(args.html).write_text(page(f"Ranking: {args.prompt}", facts, [("", args.prompt, cards)]))
        print(f"wrote {args.html}")


if __name__ == "__main__":
    main()
