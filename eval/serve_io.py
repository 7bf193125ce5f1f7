"""What the judge server accepts: request bodies checked against limits, images decoded from bytes.

Every rejection is a ``RequestError(status, one line)``, which the server answers as
``{"error": "…"}``:

| status | when |
|---|---|
| 400 | the body is not JSON |
| 413 | a limit (``Limits``): body bytes, items per request, images per request, bytes or pixels of an image, prompt tokens |
| 422 | a wrong type or value (a missing prompt, images not a list, a negative seed), an empty or non-text prompt, an image that is not base64, not PNG/JPEG/WebP, truncated or undecodable, a URL or a path instead of bytes |

Images are decoded exactly as ``eval.rank`` decodes a file (``PIL.Image.open``, ``load``, then
``data.images.normalize_image``), so the same bytes give the same pixels and the same scores.
The server never opens a path and never fetches a URL: a string that is not base64 image bytes
(or a ``data:…;base64,`` URL) is rejected.
"""

from __future__ import annotations

import base64
import binascii
import dataclasses
import io
import json
import re
from dataclasses import asdict, dataclass

from PIL import Image

from data.images import DECODE_ERRORS, BadImageError, decode_errors_as_bad_image, normalize_image
from data.sets import prompt_problem
from eval.batch import Item

FORMATS = ("PNG", "JPEG", "WEBP")


class RequestError(Exception):
    """A rejected request: its HTTP status and a one-line reason."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status, self.message = status, " ".join(str(message).split())


@dataclass(frozen=True)
class Limits:
    """What one request may carry; beyond it the server answers 413."""

    max_body_bytes: int = dataclasses.field(
        default=64 * 2**20, metadata={"help": "bytes of one request body"}
    )
    max_items: int = dataclasses.field(default=64, metadata={"help": "items in one /v1/score request"})
    max_images: int = dataclasses.field(default=64, metadata={"help": "images in one request, all items"})
    max_image_bytes: int = dataclasses.field(
        default=16 * 2**20, metadata={"help": "encoded bytes of one image"}
    )
    max_image_pixels: int = dataclasses.field(default=4096 * 4096, metadata={
        "help": "width × height of one image, read from its header before decoding"})  # fmt: skip
    max_prompt_tokens: int = dataclasses.field(default=512, metadata={"help": "tokens of one prompt"})

    @staticmethod
    def add_arguments(parser) -> None:
        for f in dataclasses.fields(Limits):
            parser.add_argument(f"--{f.name.replace('_', '-')}", type=int, default=f.default,
                                help=f"limit: {f.metadata['help']} (default {f.default:,}; beyond: 413)")  # fmt: skip

    @classmethod
    def from_args(cls, args) -> Limits:
        limits = cls(**{name: getattr(args, name) for name in asdict(cls())})
        bad = [name for name, value in asdict(limits).items() if value < 1]
        if bad:
            raise ValueError(f"--{bad[0].replace('_', '-')} must be ≥ 1")
        return limits

    def as_dict(self) -> dict:
        return asdict(self)


async def read_json(request, max_bytes: int):
    """The request body parsed as JSON, read up to ``max_bytes`` (413 beyond, 400 if not JSON)."""
    length = request.headers.get("content-length")
    if length is not None and length.isdigit() and int(length) > max_bytes:
        raise RequestError(
            413, f"request body of {int(length):,} bytes, more than the limit of {max_bytes:,}"
        )
    body = bytearray()
    async for chunk in request.stream():
        body += chunk
        if len(body) > max_bytes:
            raise RequestError(413, f"request body over the limit of {max_bytes:,} bytes")
    try:
        return json.loads(body)
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise RequestError(400, f"invalid JSON: {e}") from None


def decode_image(value, where: str, limits: Limits) -> Image.Image:
    """An image from base64 bytes (or a ``data:image/…;base64,`` URL), checked and normalised."""
    if not isinstance(value, str):
        raise RequestError(422, f"{where}: expected a base64 string, got {type(value).__name__}")
    if value.startswith("data:"):
        header, _, value = value.partition(",")
        if not header.endswith(";base64"):
            raise RequestError(422, f"{where}: a data URL must be base64 (data:image/png;base64,…)")
    elif value.startswith(("http://", "https://", "file:")):
        raise RequestError(422, f"{where}: send the image bytes in base64; the server never fetches a URL "
                                "or opens a path")  # fmt: skip
    if len(value) > (limits.max_image_bytes + 2) // 3 * 4 + 4:
        raise RequestError(413, f"{where}: image over the limit of {limits.max_image_bytes:,} bytes")
    try:
        raw = base64.b64decode(value, validate=True)
    except (binascii.Error, ValueError):
        raise RequestError(
            422, f"{where}: not valid base64 (send the image bytes; the server never opens a path)"
        ) from None
    if len(raw) > limits.max_image_bytes:
        raise RequestError(
            413, f"{where}: image of {len(raw):,} bytes, over the limit of {limits.max_image_bytes:,}"
        )
    try:
        with decode_errors_as_bad_image(where), Image.open(io.BytesIO(raw)) as im:
            if im.format not in FORMATS:
                raise RequestError(422, f"{where}: {im.format} image; send PNG, JPEG or WebP")
            if im.width * im.height > limits.max_image_pixels:
                raise RequestError(413, f"{where}: {im.width}x{im.height} image, over the limit of "
                                        f"{limits.max_image_pixels:,} pixels")  # fmt: skip
            im.load()
            return normalize_image(im, source=where)
    except BadImageError as e:
        if isinstance(e.__cause__, Image.DecompressionBombError):
            raise RequestError(
                413, f"{where}: image over the limit of {limits.max_image_pixels:,} pixels"
            ) from None
        raise RequestError(
            422, re.sub(r"<_io\.BytesIO object at 0x[0-9a-f]+>", "(the bytes sent)", str(e))
        ) from None
    except DECODE_ERRORS as e:  # raised by normalize_image outside the decoding block
        raise RequestError(422, f"bad image {where}: {e}") from None


def check_prompt(prompt, where: str, limits: Limits, tokenizer) -> str:
    if not isinstance(prompt, str):
        raise RequestError(422, f"{where}: expected a string, got {type(prompt).__name__}")
    problem = prompt_problem(prompt)
    if problem is not None:
        raise RequestError(422, f"{where}: {problem}")
    n = len(tokenizer.encode(prompt, add_special_tokens=False))
    if n > limits.max_prompt_tokens:
        raise RequestError(413, f"{where}: {n} tokens, over the limit of {limits.max_prompt_tokens}")
    return prompt


def check_seed(value, where: str) -> int:
    if value is None:
        return 0
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
        raise RequestError(422, f"{where}: expected an integer ≥ 0, got {value!r}")
    return value


def required(obj: dict, key: str, kind: type, where: str):
    if key not in obj:
        raise RequestError(422, f"{where}: missing {key!r}")
    if not isinstance(obj[key], kind):
        raise RequestError(422, f"{where}.{key}: expected {kind.__name__}, got {type(obj[key]).__name__}")
    return obj[key]


def parse_item(obj, where: str, limits: Limits, tokenizer, n_images: int | None = None) -> Item:
    """One ``{"prompt", "images", "seed"?}`` object; ``n_images`` demands that many images."""
    if not isinstance(obj, dict):
        raise RequestError(422, f"{where}: expected an object, got {type(obj).__name__}")
    prompt = check_prompt(required(obj, "prompt", str, where), f"{where}.prompt", limits, tokenizer)
    images = required(obj, "images", list, where)
    if not images:
        raise RequestError(422, f"{where}.images: empty")
    if n_images is not None and len(images) != n_images:
        raise RequestError(422, f"{where}.images: expected {n_images} images, got {len(images)}")
    if len(images) > limits.max_images:
        raise RequestError(
            413, f"{where}.images: {len(images)} images, over the limit of {limits.max_images}"
        )
    decoded = [decode_image(v, f"{where}.images[{i}]", limits) for i, v in enumerate(images)]
    return Item(prompt, decoded, check_seed(obj.get("seed"), f"{where}.seed"))


def parse_items(payload, limits: Limits, tokenizer) -> tuple[list[Item], bool]:
    """``/v1/score``'s body: the items and whether to return every rollout (``details``)."""
    if not isinstance(payload, dict):
        raise RequestError(422, f"body: expected an object with 'items', got {type(payload).__name__}")
    items = required(payload, "items", list, "body")
    if not items:
        raise RequestError(422, "body.items: empty")
    if len(items) > limits.max_items:
        raise RequestError(413, f"body.items: {len(items)} items, over the limit of {limits.max_items}")
    total = sum(len(x["images"]) for x in items if isinstance(x, dict) and isinstance(x.get("images"), list))
    if total > limits.max_images:
        raise RequestError(413, f"body: {total} images, over the limit of {limits.max_images} per request")
    details = payload.get("details", False)
    if not isinstance(details, bool):
        raise RequestError(422, f"body.details: expected a boolean, got {type(details).__name__}")
    return [parse_item(x, f"items[{i}]", limits, tokenizer) for i, x in enumerate(items)], details


def parse_group(payload, limits: Limits, tokenizer, n_images: int | None) -> Item:
    """``/v1/compare`` (two images) and ``/v1/rank``'s body: one item."""
    return parse_item(payload, "body", limits, tokenizer, n_images)


def parse_chat(payload, limits: Limits, tokenizer) -> Item:
    """An OpenAI chat-completions body as one item: the text parts of the last user message are
    the prompt the images were generated from, its ``image_url`` parts (``data:`` URLs) the images,
    ``seed`` the item's seed. The judge applies its own instructions; sampling is the server's."""
    if not isinstance(payload, dict):
        raise RequestError(422, f"body: expected an object, got {type(payload).__name__}")
    if payload.get("stream"):
        raise RequestError(422, "body.stream: streaming is not supported")
    if payload.get("n", 1) != 1:
        raise RequestError(422, "body.n: only n = 1 is supported (use seed for other rollouts)")
    messages = required(payload, "messages", list, "body")
    users = [m for m in messages if isinstance(m, dict) and m.get("role") == "user"]
    if not users:
        raise RequestError(422, "body.messages: no user message")
    content = users[-1].get("content")
    parts = [{"type": "text", "text": content}] if isinstance(content, str) else content
    if not isinstance(parts, list):
        raise RequestError(422, "body.messages[-1].content: expected a string or a list of parts")
    texts, images = [], []
    for i, part in enumerate(parts):
        where = f"content[{i}]"
        kind = part.get("type") if isinstance(part, dict) else None
        if kind == "text" and isinstance(part.get("text"), str):
            texts.append(part["text"])
        elif kind == "image_url" and isinstance(part.get("image_url"), dict):
            images.append(part["image_url"].get("url"))
        else:
            raise RequestError(422, f"{where}: expected a text or image_url part")
    if not images:
        raise RequestError(422, "body.messages: the user message has no image")
    obj = {"prompt": "\n".join(texts).strip(), "images": images, "seed": payload.get("seed")}
    return parse_item(obj, "body", limits, tokenizer)
