"""The markdown of ``experiments/bench.py``: the results table, the workload and machine it ran on,
and the generated section of the repository's ``BENCHMARKS.md``."""

from __future__ import annotations

import os
import platform
from pathlib import Path

from bench_workers import ROOT

MARK_BEGIN, MARK_END = "<!-- bench:begin (written by experiments/bench.py) -->", "<!-- bench:end -->"


WORKLOAD_TEXT = {
    "small": ("tiny preset 'small' (text 256×4, vision 128×4, ~6M parameters, vocabulary 896, random weights)",
              "synthetic HPDv2 pairs, 200×200 px (49 image tokens per image), prompt 238 tokens"),
    "real": ("the real Qwen2.5-VL-7B-Instruct configuration shrunk to text 128×2, vision 64×2 (`models.tiny --like`; "
             "39.7M parameters, 39M of them the embedding and the LM head of the real vocabulary 152,064; real "
             "tokenizer, chat template and processor; random weights)",
             "synthetic HPDv2 pairs, 448×448 px (256 image tokens per image), prompt 628 tokens"),
}  # fmt: skip


def workload_summary(cfg, workload: str) -> dict:
    g = cfg.grpo
    model, data = WORKLOAD_TEXT[workload]
    return {"model": model, "data": data,
            "G": g.group_size, "prompts_per_step": g.prompts_per_step,
            "completions_per_step": g.prompts_per_step * g.group_size, "new_tokens": g.max_new_tokens,
            "beta": g.kl_coef, "mu": g.ppo_epochs, "epsilon": g.clip_eps, "lr": cfg.train.lr,
            "trainable": "all weights, vision tower included; frozen reference copy",
            "gradient_checkpointing": cfg.model.gradient_checkpointing}  # fmt: skip


def machine_summary(threads: int) -> dict:
    import torch
    import transformers
    import trl

    cpuinfo = Path("/proc/cpuinfo")
    flags = set(cpuinfo.read_text().split()) if cpuinfo.exists() else set()
    return {"cpu": platform.processor() or platform.machine(), "cores": os.cpu_count(), "threads": threads,
            "amx": "amx_bf16" in flags, "avx512_bf16": "avx512_bf16" in flags,
            "load_avg_at_end": os.getloadavg(), "torch": torch.__version__,
            "transformers": transformers.__version__, "trl": trl.__version__}  # fmt: skip


def command_line(a) -> str:
    args = ["python experiments/bench.py", f"--out {os.path.relpath(a.out, ROOT)}"]
    if a.quick:
        args.append("--quick")
    if a.threads != 1:
        args.append(f"--threads {a.threads}")
    if a.malloc_mmap_threshold != 1 << 20:
        args.append(f"--malloc-mmap-threshold {a.malloc_mmap_threshold}")
    if not a.quick and sorted(a.precisions) != ["bf16", "fp32"]:
        args.append("--precisions " + " ".join(a.precisions))
    if a.headline_only:
        args.append("--headline-only")
    if sorted(a.workloads) != ["real", "small"]:
        args.append("--workloads " + " ".join(a.workloads))
    if not a.quick and (a.real_steps, a.real_rounds) != (2, 2):
        args.append(f"--real-steps {a.real_steps} --real-rounds {a.real_rounds}")
    return " ".join(args)


def markdown(r: dict) -> str:
    m = r["machine"]
    mmap_threshold = r["protocol"].get("malloc_mmap_threshold", "glibc default (dynamic)")
    lines = [
        f"Command: `{r['command']}`{' (`make bench`)' if r['command'].endswith('runs/bench') else ''}, {m['threads']} thread(s) per process, "
        f"{m['cores']} cores, AMX {'yes' if m['amx'] else 'no'}, `MALLOC_MMAP_THRESHOLD_` {mmap_threshold}, torch {m['torch']}, "
        f"transformers {m['transformers']}, trl {m['trl']}; load average at the end {m['load_avg_at_end'][0]:.1f} "
        "(other jobs share the machine: timings are medians over alternating processes).",
    ]  # fmt: skip
    for name, wl in r["workloads"].items():
        w, pr = wl["workload"], wl["protocol"]
        lines += [
            "",
            f"**Workload {name}**: G = {w['G']}, {w['prompts_per_step']} prompts per step ({w['completions_per_step']} "
            f"completions), {w['new_tokens']} new tokens forced, β = {w['beta']}, μ = {w['mu']}, activation "
            f"checkpointing {'on' if w['gradient_checkpointing'] else 'off'} (both sides); {w['model']}; {w['data']}. "
            f"{pr['processes_per_side_and_precision']} process(es) per side, {pr['timed_steps_per_process']} timed "
            f"step(s) each after {pr['warmup_steps_per_process']} warm-up.",
            "",
            "| precision | side | median step (s) | CPU time (s) | completions/s | peak RSS (MiB) | RSS after setup (MiB) | speedup | speedup by CPU time | peak RSS ratio |",
            "|---|---|---|---|---|---|---|---|---|---|",
        ]  # fmt: skip
        precisions = {k: v for k, v in wl.items() if k in ("fp32", "bf16")}
        for precision, p in precisions.items():
            for side in ("ours", "trl"):
                s = p[side]
                speed = f"**{p['speedup']:.2f}×**" if side == "ours" else ""
                speed_cpu = f"{p['speedup_cpu_time']:.2f}×" if side == "ours" else ""
                ratio = f"**{p['peak_rss_ratio']:.2f}**" if side == "ours" else ""
                lines.append(f"| {precision} | {'ours' if side == 'ours' else 'TRL GRPOTrainer'} | {s['median_step_s']:.2f} | "
                             f"{s['median_step_cpu_s']:.2f} | {s['completions_per_s']:.2f} | {s['peak_rss_mb']:.0f} | "
                             f"{s['setup_rss_mb']:.0f} | {speed} | {speed_cpu} | {ratio} |")  # fmt: skip
        lines += ["", "Our step by phase (median s): " + "; ".join(
            f"{prec}: " + ", ".join(f"{k} {v:.2f}" for k, v in p["ours"]["phases_s"].items())
            for prec, p in precisions.items())]  # fmt: skip
    if r.get("sharing_real") is not None:
        lines += ["", "Real workload, our step with activation checkpointing on, prefix sharing on vs off (fp32):", "",
                  "| prefix sharing | step (s) | generate | reference | update |", "|---|---|---|---|---|"]  # fmt: skip
        for x in sorted(r["sharing_real"].values(), key=lambda x: not x["share_prefix"]):
            ph = x["phases_s"]
            lines.append(f"| {'on' if x['share_prefix'] else 'off'} | {x['step_s']:.2f} | {ph['generate']:.2f} | "
                         f"{ph['reference']:.2f} | {ph['update']:.2f} |")  # fmt: skip
    if r["group_sizes"] is not None:
        lines += extras_markdown(r)
    return "\n".join(lines) + "\n"


def extras_markdown(r: dict) -> list[str]:
    lines = []
    lines += ["", "Our step against G (fp32; prefill = the prompt forward alone, B = 2 prompts with their images):", "",
              "| G | prefix sharing | step (s) | completions/s | generate | reference | update | prefill (s) |",
              "|---|---|---|---|---|---|---|---|"]  # fmt: skip
    for x in sorted(r["group_sizes"].values(), key=lambda x: (x["G"], not x["share_prefix"])):
        ph = x["phases_s"]
        lines.append(f"| {x['G']} | {'on' if x['share_prefix'] else 'off'} | {x['step_s']:.2f} | "
                     f"{x['completions_per_s']:.1f} | {ph['generate']:.2f} | {ph['reference']:.2f} | "
                     f"{ph['update']:.2f} | {x['prefill_s']:.3f} |")  # fmt: skip
    h = r["lm_head"]
    lines += ["", "LM head on completion positions only vs all positions (fp32 forward+backward of one log-prob pass, "
              f"16 rows): {h['completion_positions']['fwd_bwd_s']:.2f} s with logits "
              f"{h['completion_positions']['logits_shape']} ({h['completion_positions']['logits_mb']:.1f} MiB) vs "
              f"{h['all_positions']['fwd_bwd_s']:.2f} s with {h['all_positions']['logits_shape']} "
              f"({h['all_positions']['logits_mb']:.1f} MiB)."]  # fmt: skip
    lines += ["", "Evaluation throughput (fp32, batch 16, k = 1, "
              f"{r['eval']['soft_rating']['max_new_tokens']} new tokens at most):", "",
              "| method | images | images/s |", "|---|---|---|"]  # fmt: skip
    for name, e in r["eval"].items():
        lines.append(f"| {name.replace('_', ' ')} | {e['images']} | {e['images_per_s']:.2f} |")
    return lines


def update_benchmarks_md(path: Path, table: str) -> None:
    """Replace the generated section of BENCHMARKS.md (between the markers), or append one."""
    text = path.read_text() if path.exists() else "# Benchmarks\n"
    block = f"{MARK_BEGIN}\n{table}{MARK_END}"
    if MARK_BEGIN in text and MARK_END in text:
        head, rest = text.split(MARK_BEGIN, 1)
        text = head + block + rest.split(MARK_END, 1)[1]
    else:
        text = text.rstrip("\n") + "\n\n" + block + "\n"
    path.write_text(text)
