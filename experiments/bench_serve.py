"""The judge as a reward service: batched scoring against one call per item, and the server's latency.

    python experiments/bench.py --workloads serve --out runs/bench      # part of make bench

- **Throughput.** The same ``ITEMS`` items, each a different prompt with one image (the rating
  task, a diffusion trainer's step of freshly generated pairs), scored (a) one at a time with
  ``eval.rank.PreferenceScorer.score`` and (b) in one ``eval.batch.BatchScorer.score`` call: the
  same loaded model, k = 1, ``NEW_TOKENS`` new tokens at most, one torch thread. Both sides draw
  each item's rollouts from its own seed, so they sample the same texts and their soft scores agree
  (the largest difference is recorded). Each side is timed ``repeats`` times after one warm-up;
  the medians give items/s.
- **Latency.** ``python -m eval.serve`` on the same model in its own process (one torch thread);
  C ∈ {1, 4, 16} client threads (``eval.client.JudgeClient``, PNG over HTTP) each send one-item
  requests back to back; p50 and p99 of the request latency and the items/s the server delivered.

The model is the tiny Qwen2.5-VL (``python -m models.tiny``, about 1M parameters, random
weights); its images are 64–128 px (4–16 image tokens). Writes ``workloads.serve`` of
``bench.json``: ``batched_items_per_s``, ``sequential_items_per_s``, ``speedup``,
``latency_ms.{c1,c4,c16}.{p50,p99}``.
"""

from __future__ import annotations

import os
import socket
import statistics
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from eval.batch import BatchScorer, Item
from eval.client import JudgeClient
from eval.rank import PreferenceScorer
from eval.score import ScoringSpec
from models.tiny import build_tiny

SERVE = "serve"
ITEMS = 64
NEW_TOKENS = 64
CONCURRENCY = (1, 4, 16)
REQUESTS_PER_CLIENT = 4
SCALE = (1, 2, 3, 4, 5, 6, 7)
SUBJECTS = ("a red fox", "a lighthouse", "a bowl of ramen", "a city at night", "an old tree", "a sailing boat",
            "a robot", "a mountain lake")  # fmt: skip
STYLES = ("in watercolour", "as a photo", "in pixel art", "at sunset", "in the snow", "in a forest", "on Mars",
          "in a sketchbook")  # fmt: skip


def workload_items(n: int, seed: int = 0) -> list[Item]:
    """``n`` items with different prompts, one 64–128 px image each (blocks of colour and noise)."""
    rng = np.random.default_rng(seed)
    items = []
    for i in range(n):
        h, w = (int(x) for x in rng.integers(64, 129, size=2))
        base = rng.integers(0, 256, size=(1, 1, 3))
        pixels = np.clip(base + rng.normal(0, 40, size=(h, w, 3)), 0, 255).astype(np.uint8)  # (H, W, 3)
        prompt = f"{SUBJECTS[i % len(SUBJECTS)]} {STYLES[(i // len(SUBJECTS)) % len(STYLES)]}, picture {i}"
        items.append(Item(prompt, [Image.fromarray(pixels)]))  # seed 0: each prompt its own stream
    return items


def timed(fn, repeats: int) -> tuple[float, object]:
    """Median seconds of ``repeats`` calls after one warm-up, and the last result."""
    fn()
    times, out = [], None
    for _ in range(repeats):
        t0 = time.perf_counter()
        out = fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times), out


def throughput(model_dir: Path, items: list[Item], new_tokens: int, repeats: int) -> dict:
    """Batched vs one-call-per-item items/s on the same loaded model."""
    scorer = PreferenceScorer(str(model_dir), "rating", k=1, scale=SCALE, max_new_tokens=new_tokens)
    batched = BatchScorer(scorer.model, scorer.processor, ScoringSpec("rating", SCALE, 1, new_tokens))

    seq_s, seq = timed(lambda: [scorer.score(it.prompt, it.images) for it in items], repeats)
    bat_s, bat = timed(lambda: batched.soft_scores(items), repeats)
    diff = max(abs(a - b) for x, y in zip(seq, bat) for a, b in zip(x, y))
    return {"items": len(items), "max_new_tokens": new_tokens, "sequential_s": seq_s, "batched_s": bat_s,
            "sequential_items_per_s": len(items) / seq_s, "batched_items_per_s": len(items) / bat_s,
            "speedup": seq_s / bat_s, "max_abs_soft_difference": diff}  # fmt: skip


def latency(
    model_dir: Path, items: list[Item], new_tokens: int, threads: int, out: Path, per_client: int
) -> dict:
    """p50/p99 request latency at each concurrency, one-item requests, a real server process."""
    port = free_port()
    cmd = [sys.executable, "-m", "eval.serve", "--model", str(model_dir), "--port", str(port), "--max-new-tokens",
           str(new_tokens), "--scale", "1-7", "--threads", str(threads), "--log-level", "warning"]  # fmt: skip
    env = {**os.environ, "OMP_NUM_THREADS": str(threads), "MKL_NUM_THREADS": str(threads)}
    log = open(out / "serve-bench-server.log", "w")  # noqa: SIM115 - closed after the server stops
    proc = subprocess.Popen(cmd, env=env, stdout=log, stderr=subprocess.STDOUT, cwd=Path(__file__).parents[1])
    try:
        JudgeClient(f"http://127.0.0.1:{port}", retries=60, backoff_s=0.5, max_backoff_s=1).health()
        result = {}
        for c in CONCURRENCY:
            JudgeClient(f"http://127.0.0.1:{port}").soft_scores(items[:1])  # warm
            lat: list[float] = []
            t0 = time.perf_counter()
            workers = [threading.Thread(target=send_back_to_back, args=(port, items, j, per_client, lat))
                       for j in range(c)]  # fmt: skip
            for w in workers:
                w.start()
            for w in workers:
                w.join()
            wall = time.perf_counter() - t0
            assert len(lat) == c * per_client, "every request answered"
            result[f"c{c}"] = {"p50": float(np.percentile(lat, 50)) * 1000, "p99": float(np.percentile(lat, 99)) * 1000,
                               "requests": len(lat), "items_per_s": len(lat) / wall}  # fmt: skip
        return result
    finally:
        proc.terminate()
        proc.wait(30)
        log.close()


def send_back_to_back(port: int, items: list[Item], j: int, n: int, lat: list[float]) -> None:
    """Client ``j``: ``n`` one-item requests, one after the other; appends each one's seconds to ``lat``."""
    client = JudgeClient(f"http://127.0.0.1:{port}")
    for r in range(n):
        item = items[(j * n + r) % len(items)]
        t0 = time.perf_counter()
        client.soft_scores([item])
        lat.append(time.perf_counter() - t0)


def free_port() -> int:
    """A TCP port on 127.0.0.1 that was free a moment ago."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def run_serve(out: Path, threads: int = 1, quick: bool = False) -> dict:
    """The serve workload (see the module doc); ``quick``: 8 items, 8 tokens, one repeat, one request per client."""
    torch.set_num_threads(threads)
    model_dir = out / "serve-model"
    if not (model_dir / "model.safetensors").exists():
        build_tiny(model_dir, seed=0)
    n, new_tokens, repeats, per_client = (
        (8, 8, 1, 1) if quick else (ITEMS, NEW_TOKENS, 3, REQUESTS_PER_CLIENT)
    )
    items = workload_items(n)
    print(f"serve: {n} items, batched vs one at a time", file=sys.stderr)
    result = throughput(model_dir, items, new_tokens, repeats)
    print("serve: latency at 1, 4, 16 concurrent clients", file=sys.stderr)
    result["latency_ms"] = latency(model_dir, items, new_tokens, threads, out, per_client)
    result["model"] = "tiny Qwen2.5-VL (models.tiny, ~1M parameters)"
    return result


def serve_markdown(r: dict) -> str:
    """The serve workload's lines for BENCHMARKS.md."""
    lat = r["latency_ms"]
    lines = ["", f"**Workload serve**: {r['items']} items (a different prompt each, one image, rating task), k = 1, "
             f"{r['max_new_tokens']} new tokens at most, {r['model']}, one torch thread.", "",
             "| path | items/s | speedup |", "|---|---|---|",
             f"| one `PreferenceScorer.score` call per item | {r['sequential_items_per_s']:.1f} | |",
             f"| one `BatchScorer.score` call | {r['batched_items_per_s']:.1f} | **{r['speedup']:.1f}×** |", "",
             "| concurrent clients (one item per request) | p50 (ms) | p99 (ms) | items/s |", "|---|---|---|---|"]  # fmt: skip
    for c, x in lat.items():
        lines.append(f"| {c[1:]} | {x['p50']:.0f} | {x['p99']:.0f} | {x['items_per_s']:.1f} |")
    return "\n".join(lines) + "\n"
