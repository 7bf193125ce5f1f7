"""A client of ``python -m eval.serve``: ``JudgeClient(url)``, in Flow-GRPO's reward-function shape.

    judge = JudgeClient("http://127.0.0.1:8000")
    scores, info = judge(images, prompts, metadata)       # Flow-GRPO: images NCHW float, NHWC uint8 or PIL
    results = judge.score([Item("a red fox", [im1, im2])])  # /v1/score: soft, hard, parsed, reasoning

Images are sent as PNG (lossless: the server scores the same pixels as an in-process judge;
``image_format="JPEG"`` sends less) in one POST per call. A refused connection, a dropped one,
and 502/503/504 answers are retried with exponential backoff (``backoff_s · 2^attempt``, at most
``max_backoff_s``; a 503's ``Retry-After`` is honoured when longer), up to ``retries`` times; any
other 4xx/5xx raises ``JudgeError`` with the server's one-line reason at once. It has the
``eval.adapters`` judge interface (``method``, ``soft_scores``), so ``PointwiseReward(client)``
and ``GroupwiseReward(client)`` work over HTTP too. Standard library only (``urllib``).
"""

from __future__ import annotations

import base64
import io
import json
import time
import urllib.error
import urllib.request

import numpy as np
from PIL import Image

from eval.adapters import flow_grpo_scores
from eval.batch import Item

RETRIED_STATUS = (502, 503, 504)


class JudgeError(RuntimeError):
    """The server refused a request (its status and one-line reason), or never answered."""

    def __init__(self, message: str, status: int | None = None) -> None:
        super().__init__(message)
        self.status = status


def encode_image(image: Image.Image, image_format: str = "PNG") -> str:
    """An image as base64 bytes for the server."""
    buf = io.BytesIO()
    image.convert("RGB").save(buf, format=image_format, **({"quality": 95} if image_format == "JPEG" else {}))
    return base64.b64encode(buf.getvalue()).decode("ascii")


class JudgeClient:
    """The judge server at ``url`` (e.g. ``http://127.0.0.1:8000``); see the module doc."""

    def __init__(
        self,
        url: str,
        timeout_s: float = 600.0,
        retries: int = 5,
        backoff_s: float = 0.5,
        max_backoff_s: float = 30.0,
        image_format: str = "PNG",
    ) -> None:
        if image_format not in ("PNG", "JPEG", "WEBP"):
            raise ValueError(f"image_format must be PNG, JPEG or WEBP, got {image_format!r}")
        self.url = url.rstrip("/")
        self.timeout_s, self.retries = timeout_s, retries
        self.backoff_s, self.max_backoff_s = backoff_s, max_backoff_s
        self.image_format = image_format
        self.retried = 0  # requests sent again so far
        self._info: dict | None = None

    # ------------------------------------------------------------------ HTTP with retries

    def request(self, path: str, payload: dict | None = None) -> dict:
        """GET (no payload) or POST JSON to ``path``; the decoded JSON answer."""
        data = None if payload is None else json.dumps(payload).encode("utf-8")
        headers = {"Content-Type": "application/json"} if data is not None else {}
        last = "no attempt"
        for attempt in range(self.retries + 1):
            wait = min(self.max_backoff_s, self.backoff_s * 2**attempt)
            req = urllib.request.Request(self.url + path, data=data, headers=headers)
            try:
                with urllib.request.urlopen(req, timeout=self.timeout_s) as answer:
                    return json.loads(answer.read())
            except urllib.error.HTTPError as e:
                reason = server_reason(e)
                if e.code not in RETRIED_STATUS:
                    raise JudgeError(f"{path}: {e.code} {reason}", e.code) from None
                last = f"{e.code} {reason}"
                retry_after = e.headers.get("Retry-After", "")
                if retry_after.isdigit():
                    wait = max(wait, float(retry_after))
            except (urllib.error.URLError, ConnectionError, TimeoutError) as e:
                last = str(getattr(e, "reason", e))
            if attempt < self.retries:
                self.retried += 1
                time.sleep(wait)
        raise JudgeError(f"{path}: no answer after {self.retries + 1} attempts ({last})")

    # ------------------------------------------------------------------ endpoints

    def health(self) -> bool:
        return self.request("/health").get("status") == "ok"

    def info(self) -> dict:
        """``/v1/model``: the checkpoint, task, method, rating scale, limits and counters."""
        self._info = self.request("/v1/model")
        return self._info

    @property
    def method(self) -> str:
        return (self._info or self.info())["method"]

    def score(self, items: list[Item], details: bool = False) -> list[dict]:
        """``/v1/score``: one result per item (``soft``, ``hard``, ``parsed``, ``reasoning``, ``anchor``).

        A list larger than the server's ``max_items`` / ``max_images`` limits (``/v1/model``) is
        sent as several requests, in order; each item's result is the same either way (its seed)."""
        limits = (self._info or self.info()).get("limits", {})
        results = []
        for chunk in request_chunks(items, limits.get("max_items"), limits.get("max_images")):
            payload = {"items": [{"prompt": it.prompt, "seed": it.seed,
                                  "images": [encode_image(im, self.image_format) for im in it.images]}
                                 for it in chunk], "details": details}  # fmt: skip
            results += self.request("/v1/score", payload)["results"]
        return results

    def soft_scores(self, items: list[Item]) -> list[list[float]]:
        return [r["soft"] for r in self.score(items)]

    def __call__(self, images, prompts, metadata=None) -> tuple[np.ndarray, dict]:
        """Flow-GRPO's ``reward_fn(images, prompts, metadata) -> (scores, info)`` (``eval.adapters``)."""
        return flow_grpo_scores(self, images, prompts, metadata)


def request_chunks(items: list[Item], max_items: int | None, max_images: int | None) -> list[list[Item]]:
    """``items`` cut, in order, into runs of at most ``max_items`` items and ``max_images`` images
    (an item with more images than that alone goes in a run of its own, for the server to refuse)."""
    chunks: list[list[Item]] = [[]]
    images = 0
    for it in items:
        full = max_items is not None and len(chunks[-1]) >= max_items
        too_many = max_images is not None and images + len(it.images) > max_images
        if chunks[-1] and (full or too_many):
            chunks.append([])
            images = 0
        chunks[-1].append(it)
        images += len(it.images)
    return [c for c in chunks if c]


def server_reason(e: urllib.error.HTTPError) -> str:
    """The ``{"error": …}`` line of a refused request, or its HTTP reason."""
    try:
        return json.loads(e.read())["error"]
    except (ValueError, KeyError, TypeError, OSError):
        return str(e.reason)
