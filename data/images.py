"""Decoding and normalising images so that the Qwen2.5-VL processor never sees a bad one.

Every image the trainer, the evaluator or the rank CLI uses goes through ``ImageRef.load()``
(``data.types``), which decodes inside ``decode_errors_as_bad_image`` and then calls
``normalize_image``. Two guarantees follow (docs/architecture.md, bad input):

1. **Undecodable input fails with one clear line.** Corrupt bytes, a zero-byte file, a truncated
   WebP, a text file named ``.webp``, a missing file, a missing zip member or a broken zip all
   raise ``BadImageError`` (a ``ValueError``) naming the file. Readers do not decode while
   reading metadata (a 50K-image train set must read in seconds), so these are found lazily:
   the consumer catches ``BadImageError``, skips the example and counts it.
2. **Odd but valid images are normalised, not rejected.**

   ========================  ===============================================================
   input                     what ``normalize_image`` does
   ========================  ===============================================================
   RGBA, LA, PA, P+alpha     composite over white (what a viewer shows on a white page)
   P, L, 1, CMYK, YCbCr …    ``Image.convert("RGB")`` (CMYK without ICC handling)
   I;16*, I (16-bit)         scale 0…65535 → 0…255 (PIL's own convert clips to white)
   F (float)                 clip to 0…255
   longest side > 4096       downscale (aspect kept): nobody needs more, and it bounds memory
   aspect ratio > 146:1      pad the short side with white, centred, up to 146:1
   shortest side < 28        upscale (aspect kept) so the short side is 28 px
   ========================  ===============================================================

   Why 146 and not 200: Qwen2.5-VL's ``smart_resize`` raises above 200:1, but an image that is
   at least 28 px thin *and* at most 4096 px long cannot be thinner than 4096/28 ≈ 146:1, so
   padding to 146:1 satisfies all three bounds at once. We pad rather than stretch because
   stretching a 10000×10 strip by 15× along one axis invents content; padding keeps what is
   there. EXIF orientation is not applied (generated images carry none).
"""

from __future__ import annotations

import contextlib
import math
import struct
import zipfile
import zlib
from collections.abc import Iterator

import numpy as np
from PIL import Image

from common.errors import DataError

MIN_SIDE = 28  # Qwen2.5-VL: patch 14 × spatial merge 2
MAX_SIDE = 4096
MAX_ASPECT = MAX_SIDE // MIN_SIDE  # 146; the processor itself allows up to 200
BACKGROUND = (255, 255, 255)

# Everything PIL, zipfile and the file system raise for a file that is not a decodable image.
# (UnidentifiedImageError, FileNotFoundError and "image file is truncated" are OSErrors; some PIL
# plugins raise SyntaxError, EOFError, struct.error or IndexError on malformed headers.)
DECODE_ERRORS: tuple[type[BaseException], ...] = (
    OSError,
    SyntaxError,
    ValueError,
    EOFError,
    KeyError,
    IndexError,
    struct.error,
    zlib.error,
    zipfile.BadZipFile,
    Image.DecompressionBombError,
)


class BadImageError(DataError):
    """An image that cannot be decoded. The message is one line and names the file."""

    def __init__(self, source: str, reason: str) -> None:
        self.source = source
        self.reason = " ".join(str(reason).split())  # one line, whatever the cause said
        super().__init__(f"bad image {source}: {self.reason}")


@contextlib.contextmanager
def decode_errors_as_bad_image(source: str) -> Iterator[None]:
    """Turn any decoding failure inside the block into ``BadImageError(source, ...)``."""
    try:
        yield
    except BadImageError:
        raise
    except DECODE_ERRORS as e:
        raise BadImageError(source, f"{type(e).__name__}: {e}") from e


def normalize_image(im: Image.Image, source: str) -> Image.Image:
    """Return an RGB copy of ``im`` whose size the Qwen2.5-VL processor accepts (see module doc).

    ``source`` names the image in error messages. Raises ``BadImageError`` for an empty image or
    a mode PIL cannot convert to RGB.
    """
    if im.width < 1 or im.height < 1:
        raise BadImageError(source, f"empty image ({im.width}x{im.height})")
    with decode_errors_as_bad_image(source):
        rgb = _to_rgb(im)
    return _fix_size(rgb)


def _to_rgb(im: Image.Image) -> Image.Image:
    """Convert any PIL mode to RGB; transparency is composited over white."""
    if im.mode == "RGB":
        return im.copy()
    if im.mode.startswith("I;16") or im.mode == "I":
        a = np.asarray(im, dtype=np.float64)
        a = np.clip(a, 0, 65535) / 257.0  # 65535 → 255
        return Image.fromarray(np.rint(a).astype(np.uint8), mode="L").convert("RGB")
    if im.mode == "F":
        a = np.clip(np.asarray(im, dtype=np.float64), 0, 255)
        return Image.fromarray(np.rint(a).astype(np.uint8), mode="L").convert("RGB")
    has_alpha = im.mode in ("RGBA", "LA", "PA", "RGBa", "La") or (
        im.mode == "P" and "transparency" in im.info
    )
    if has_alpha:
        rgba = im.convert("RGBA")
        canvas = Image.new("RGBA", rgba.size, BACKGROUND + (255,))
        return Image.alpha_composite(canvas, rgba).convert("RGB")
    return im.convert("RGB")


def _fix_size(im: Image.Image) -> Image.Image:
    """Downscale above ``MAX_SIDE``, pad beyond ``MAX_ASPECT``:1, upscale below ``MIN_SIDE``."""
    w, h = im.size
    if max(w, h) > MAX_SIDE:
        s = MAX_SIDE / max(w, h)
        w, h = max(1, round(w * s)), max(1, round(h * s))
        im = im.resize((w, h), Image.Resampling.BICUBIC, reducing_gap=3.0)  # fast, visually the same
    if max(w, h) > MAX_ASPECT * min(w, h):
        short = math.ceil(max(w, h) / MAX_ASPECT)
        pw, ph = (w, short) if w >= h else (short, h)
        canvas = Image.new("RGB", (pw, ph), BACKGROUND)
        canvas.paste(im, ((pw - w) // 2, (ph - h) // 2))
        im, (w, h) = canvas, (pw, ph)
    if min(w, h) < MIN_SIDE:
        s = MIN_SIDE / min(w, h)
        # ceil keeps the short side at MIN_SIDE; the long side stays <= MAX_ASPECT * MIN_SIDE <= MAX_SIDE
        w, h = (MIN_SIDE, math.ceil(h * s)) if w <= h else (math.ceil(w * s), MIN_SIDE)
        im = im.resize((w, h), Image.Resampling.BICUBIC)
    return im
