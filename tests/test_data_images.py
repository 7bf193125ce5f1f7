"""Image decoding and normalisation (data/images.py, ImageRef.load): bad input (docs/architecture.md).

Every odd-but-valid image comes out RGB with a size the Qwen2.5-VL processor accepts; every
undecodable file raises BadImageError with one line naming the file.
"""

from __future__ import annotations

import io
import zipfile

import numpy as np
import pytest
from PIL import Image
from transformers import Qwen2VLImageProcessorPil

from data.images import MAX_ASPECT, MAX_SIDE, MIN_SIDE, BadImageError, normalize_image
from data.types import ImageRef


def _save(tmp_path, name: str, im: Image.Image, fmt: str, **kw) -> ImageRef:
    path = tmp_path / name
    im.save(path, fmt, **kw)
    return ImageRef(str(path))


def _webp_bytes(size=(64, 64)) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", size, (200, 30, 30)).save(buf, "WEBP", lossless=True)
    return buf.getvalue()


# ---------------------------------------------------------------- modes -> RGB


def test_cmyk_jpeg_becomes_rgb(tmp_path):
    # CMYK (0, 0, 0, 0) is no ink, i.e. white; (0, 255, 255, 0) is red.
    im = Image.new("CMYK", (40, 40), (0, 0, 0, 0))
    im.paste((0, 255, 255, 0), (0, 0, 20, 40))
    out = _save(tmp_path, "cmyk.tif", im, "TIFF").load()
    assert out.mode == "RGB"
    assert out.getpixel((30, 20)) == (255, 255, 255)
    assert out.getpixel((5, 20)) == (255, 0, 0)


def test_16bit_grayscale_is_scaled_not_clipped(tmp_path):
    # PIL's own I;16 -> RGB clips every value above 255 to white; we scale 0..65535 -> 0..255.
    a = np.zeros((32, 48), dtype=np.uint16)
    a[:, 16:32] = 32896  # 32896 / 257 = 128
    a[:, 32:] = 65535  # -> 255
    ref = _save(tmp_path, "gray16.png", Image.fromarray(a), "PNG")
    with Image.open(ref.path) as raw:
        assert raw.mode.startswith("I;16")
    out = ref.load()
    assert out.mode == "RGB"
    assert [out.getpixel((x, 10)) for x in (5, 20, 40)] == [(0, 0, 0), (128, 128, 128), (255, 255, 255)]


def test_paletted_and_paletted_with_transparency(tmp_path):
    p = Image.new("RGB", (32, 32), (10, 200, 30)).convert("P", palette=Image.Palette.ADAPTIVE)
    assert _save(tmp_path, "p.png", p, "PNG").load().getpixel((3, 3)) == (10, 200, 30)
    pt = Image.new("P", (32, 32), 0)
    pt.putpalette([0, 0, 255] + [255, 0, 0] * 255)
    pt.paste(1, (0, 0, 16, 32))
    out = _save(tmp_path, "pt.png", pt, "PNG", transparency=0).load()  # index 0 (blue) is transparent
    assert out.getpixel((5, 5)) == (255, 0, 0)
    assert out.getpixel((25, 5)) == (255, 255, 255)  # transparent -> white, not blue or black


def test_rgba_and_la_are_composited_on_white(tmp_path):
    im = Image.new("RGBA", (32, 32), (0, 0, 0, 0))  # fully transparent black
    im.paste((255, 0, 0, 128), (0, 0, 16, 32))  # half-transparent red
    out = _save(tmp_path, "rgba.png", im, "PNG").load()
    assert out.mode == "RGB"
    assert out.getpixel((25, 5)) == (255, 255, 255)
    r, g, b = out.getpixel((5, 5))
    assert r == 255 and abs(g - 127) <= 1 and abs(b - 127) <= 1  # 0.5 red + 0.5 white
    la = Image.new("LA", (32, 32), (0, 0))
    assert _save(tmp_path, "la.png", la, "PNG").load().getpixel((1, 1)) == (255, 255, 255)


@pytest.mark.parametrize("mode,value,expected", [("L", 77, (77, 77, 77)), ("1", 1, (255, 255, 255))])
def test_grayscale_and_bilevel(tmp_path, mode, value, expected):
    out = _save(tmp_path, f"{mode}.png", Image.new(mode, (30, 30), value), "PNG").load()
    assert out.mode == "RGB" and out.getpixel((3, 3)) == expected


# ---------------------------------------------------------------- sizes


def _processor():
    return Qwen2VLImageProcessorPil(min_pixels=56 * 56, max_pixels=28 * 28 * 16)


@pytest.mark.parametrize(
    "size", [(10000, 10), (10, 10000), (1, 1), (1, 5000), (6000, 900), (30, 4000), (3, 60)]
)
def test_extreme_sizes_are_normalised_and_pass_the_processor(size):
    im = normalize_image(Image.new("RGB", size, (0, 120, 255)), source="x.png")
    w, h = im.size
    assert min(w, h) >= MIN_SIDE, im.size
    assert max(w, h) <= MAX_SIDE, im.size
    assert max(w, h) <= MAX_ASPECT * min(w, h) <= 200 * min(w, h), im.size
    out = _processor()(images=[im], return_tensors="np")
    assert out["pixel_values"].shape[1] == 1176  # 3 channels * 2 frames * 14 * 14
    assert out["image_grid_thw"].shape == (1, 3)


def test_without_normalisation_the_processor_rejects_a_thin_strip():
    # Why the padding exists: smart_resize raises on aspect ratios above 200.
    with pytest.raises(ValueError, match="aspect ratio"):
        _processor()(images=[Image.new("RGB", (10000, 10))], return_tensors="np")


def test_sizes_within_bounds_are_left_alone():
    im = Image.new("RGB", (640, 480), (1, 2, 3))
    assert normalize_image(im, "x").size == (640, 480)
    assert normalize_image(Image.new("RGB", (28, 4000)), "x").size == (28, 4000)  # 143:1 <= 146:1


def test_tiny_image_keeps_its_colour_and_thin_strip_keeps_its_content():
    assert normalize_image(Image.new("RGB", (1, 1), (9, 99, 199)), "x").getpixel((10, 10)) == (9, 99, 199)
    strip = normalize_image(Image.new("RGB", (10000, 10), (200, 0, 0)), "x")
    w, h = strip.size
    assert strip.getpixel((w // 2, h // 2)) == (200, 0, 0)  # the strip, centred
    assert strip.getpixel((w // 2, 0)) == (255, 255, 255)  # white padding above it


def test_empty_image_is_a_bad_image():
    with pytest.raises(BadImageError, match="empty image"):
        normalize_image(Image.new("RGB", (0, 5)), source="empty.png")


# ---------------------------------------------------------------- undecodable files


def _bad_files(tmp_path) -> dict[str, ImageRef]:
    webp = _webp_bytes()
    (tmp_path / "corrupt.webp").write_bytes(b"RIFF\x10\x00\x00\x00WEBPVP8L" + bytes(range(256)) * 4)
    (tmp_path / "random.png").write_bytes(np.random.default_rng(0).bytes(2000))
    (tmp_path / "zero.webp").write_bytes(b"")
    (tmp_path / "truncated.webp").write_bytes(webp[: len(webp) // 2])
    (tmp_path / "text.webp").write_text("this is not an image\n")
    png = io.BytesIO()
    Image.new("RGB", (64, 64), (1, 2, 3)).save(png, "PNG")
    (tmp_path / "truncated.png").write_bytes(png.getvalue()[:60])
    with zipfile.ZipFile(tmp_path / "good.zip", "w") as zf:
        zf.writestr("part/ok.webp", webp)
        zf.writestr("part/zero.webp", b"")
    (tmp_path / "broken.zip").write_bytes(b"PK\x03\x04 not really a zip")
    refs = {
        n: ImageRef(str(tmp_path / n)) for n in ("corrupt.webp", "random.png", "zero.webp", "truncated.webp")
    }
    refs |= {n: ImageRef(str(tmp_path / n)) for n in ("text.webp", "truncated.png", "missing.webp")}
    refs["missing member"] = ImageRef(str(tmp_path / "good.zip"), "part/nope.webp")
    refs["zero member"] = ImageRef(str(tmp_path / "good.zip"), "part/zero.webp")
    refs["broken zip"] = ImageRef(str(tmp_path / "broken.zip"), "part/ok.webp")
    refs["missing zip"] = ImageRef(str(tmp_path / "nope.zip"), "part/ok.webp")
    return refs


def test_every_undecodable_file_raises_one_line_naming_it(tmp_path):
    refs = _bad_files(tmp_path)
    for case, ref in refs.items():
        with pytest.raises(BadImageError) as info:
            ref.load()
        msg = str(info.value)
        assert str(ref) in msg, (case, msg)
        assert "\n" not in msg, (case, msg)
        assert isinstance(info.value, ValueError)
    assert ImageRef(str(tmp_path / "good.zip"), "part/ok.webp").load().size == (64, 64)  # the control
