"""Peak memory of one GRPO update pass: ``python experiments/bench_memory.py MODEL_DIR [--completions 16] [--tokens 512]``.

The memory of the log-prob passes at the real vocabulary (BENCHMARKS.md): one
``grpo.train.update_pass`` (forward, backward, optimizer step) over ``--completions`` random
completions of ``--tokens`` tokens, 2 images of 448×448 per prompt, G = 8 (fewer when N < 8), fp32, one
thread. Prints the process's peak RSS (``ru_maxrss``) before and after the pass. MODEL_DIR is any
Qwen2.5-VL folder, e.g. ``python -m models.tiny runs/like --like ../shared/fixtures/qwen2.5-vl-7b-instruct``.
"""

from __future__ import annotations

import argparse
import resource
import time

import torch
from PIL import Image

from common.config import load_config
from data.prompts import messages_for
from grpo.rollout import RolloutBuffer
from grpo.train import update_pass
from models.qwen_vl import build_inputs, load_policy, render_prompt


def peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("model", help="a Qwen2.5-VL folder")
    p.add_argument("--completions", type=int, default=16, help="N (default 16)")
    p.add_argument("--tokens", type=int, default=512, help="T (default 512)")
    p.add_argument("--checkpointing", action="store_true", help="activation checkpointing on")
    p.add_argument("--no-share", action="store_true", help="repeat the prompt rows instead of sharing them")
    a = p.parse_args(argv)
    torch.set_num_threads(1)
    N, T = a.completions, a.tokens
    G = min(8, N)
    B = N // G
    model, processor = load_policy(a.model)
    if a.checkpointing:
        model.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
    model.train()
    colours = ["red", "blue", "green", "black", "yellow", "purple"][:B]
    images = [[Image.new("RGB", (448, 448), c), Image.new("RGB", (448, 448), "white")] for c in colours]
    texts = [render_prompt(processor, messages_for("pair", "a red fox in the snow", 2)) for _ in range(B)]
    inputs = build_inputs(processor, texts, images)
    torch.manual_seed(0)
    ids = torch.randint(0, min(151_000, model.config.text_config.vocab_size - 100), (N, T))
    overrides = [
        f"grpo.group_size={G}",
        f"grpo.minibatch_size={N}",
        "grpo.kl_coef=0.04",
        "model.dtype=float32",
    ]
    cfg = load_config(None, overrides)
    buf = RolloutBuffer(inputs, G, ids, torch.ones_like(ids), [""] * N, torch.zeros(N, dtype=torch.bool), [None] * B,
                        share_prefix=not a.no_share)  # fmt: skip
    buf.advantages_N, buf.ref_logp_NT = torch.randn(N), torch.full((N, T), -12.0)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.0)
    before = peak_rss_mb()
    t0 = time.perf_counter()
    update_pass(model, optimizer, buf, cfg, torch.device("cpu"))
    print(f"N={N} T={T} prompt={inputs['input_ids'].shape[1]} tokens, checkpointing={a.checkpointing}, "
          f"share_prefix={not a.no_share}: peak RSS {before:.0f} → {peak_rss_mb():.0f} MiB "
          f"(+{peak_rss_mb() - before:.0f} MiB for the pass), {time.perf_counter() - t0:.1f} s")  # fmt: skip


if __name__ == "__main__":
    main()
