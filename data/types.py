"""The records that flow from the dataset readers to the trainer and the evaluator.

Both real datasets (ImageRewardDB, HPDv2) and the synthetic writer's output are read into
these three types, so ``grpo.train`` and ``eval.evaluate`` never see an on-disk format.

- ``ImageRef``: a lazily decoded image, either a file on disk or a member of a zip archive.
  ``load()`` returns an RGB ``PIL.Image`` whose size the Qwen2.5-VL processor accepts.
- ``TrainSample``: one training prompt. ``task="rating"``: one image, ``target`` is the human
  rating. ``task="pair"``: two images, ``target`` is 0 or 1 (1 = the second image is preferred).
- ``EvalGroup``: all images of one prompt with their human rank levels (lower = better, ties
  allowed), the unit that both official metric protocols average over.
"""

from __future__ import annotations

import zipfile
from dataclasses import dataclass
from pathlib import Path

from PIL import Image


@dataclass(frozen=True)
class ImageRef:
    """Where one image lives. ``member`` is set when ``path`` is a zip archive."""

    path: str
    member: str | None = None

    def __str__(self) -> str:
        return f"{self.path}::{self.member}" if self.member else self.path

    def load(self) -> Image.Image:
        """Decode the image and normalise it for the processor (see ``data.images``).

        Raises ``data.images.BadImageError`` (a ``ValueError``) naming the file if it cannot be decoded.
        """
        from data.images import decode_errors_as_bad_image, normalize_image  # local: keeps this module light

        with decode_errors_as_bad_image(str(self)):
            if self.member is None:
                with Image.open(Path(self.path)) as im:
                    im.load()
                    return normalize_image(im, source=str(self))
            with zipfile.ZipFile(self.path) as zf, zf.open(self.member) as fh, Image.open(fh) as im:
                im.load()
                return normalize_image(im, source=str(self))


@dataclass(frozen=True)
class TrainSample:
    """One training prompt: the images the model sees and the answer that earns the reward."""

    sample_id: str
    prompt: str
    images: tuple[ImageRef, ...]
    target: int
    task: str  # "rating" | "pair"


@dataclass(frozen=True)
class EvalGroup:
    """All images generated for one prompt, with human rank levels (1 = best, ties allowed) and,
    where the dataset has them (ImageRewardDB's own layout), the human ratings (else empty)."""

    group_id: str
    prompt: str
    images: tuple[ImageRef, ...]
    ranks: tuple[float, ...]
    ratings: tuple[float, ...] = ()
