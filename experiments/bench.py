"""Our GRPO step against TRL's GRPOTrainer on the same workload: ``python experiments/bench.py --out runs/bench``.

``make bench`` runs it (after installing the pinned ``trl==1.16.0`` of the ``bench`` extra). The
workload is ``experiments/bench.yaml``: the "small" tiny Qwen2.5-VL (~6M parameters, random
weights), synthetic HPDv2 pairs (2 images of 200 px = 49 image tokens each, a 238-token prompt),
G = 8 completions for each of 2 prompts per step, exactly 64 new tokens (min_new_tokens =
max_new_tokens), β = 0.04 with a frozen reference copy, μ = 1, every weight trained, no gradient
checkpointing, one forward/backward over the 16 completions, AdamW.

Every measurement runs in its own subprocess (so peak RSS is per side), the two sides alternate
(ours, TRL, TRL, ours, … per precision), each process runs ``--warmup`` steps before ``--steps``
timed ones, and the report gives medians. A step is timed from sampling to the optimizer step
on both sides (our ``grpo_step``; TRL from ``on_step_begin`` to ``on_step_end``); decoding the
images and logging are outside on both sides. Also measured: our step for G ∈ {2, 4, 8, 16}
with and without prefix sharing and the prompt prefill alone, the LM head on completion
positions only vs on every position, and evaluation throughput (soft rating; anchor ranking
with N = 9). The ``serve`` workload (``experiments/bench_serve.py``) measures the judge as a reward
service: batched scoring against one call per item, and the server's latency. Results: ``OUT/bench.json`` and ``OUT/BENCHMARKS.md``; the table also replaces the
generated section of the repository's ``BENCHMARKS.md``.

Allocator: both sides run under ``MALLOC_MMAP_THRESHOLD_=1048576`` by default
(``--malloc-mmap-threshold``, 0 for glibc's own). glibc raises its mmap threshold each time a large
block is freed, up to 32 MiB, so later tensors of up to 32 MiB come from the heap, and the heap
keeps the pages they freed: measured on the real workload, our peak RSS then grows with every step
a process runs (1,665 MiB after one step, 2,224 MiB after three) while the live tensors do not. A
fixed threshold returns every block of 1 MiB and more to the system when it is freed, so peak RSS
measures the memory each trainer uses, not how glibc's heap fragmented. It is the same setting for
both sides; CUDA memory does not go through glibc. It moves the times too: every block of 1 MiB
or more is then a fresh mmap (on the real workload, before our sampling draw and LM-head pass
reused their buffers, our step took 19% longer and TRL's 17% less; since then ours takes about as
long under either setting: BENCHMARKS.md, rows h-j).

Threads: ``--threads 1`` by default, the same for both sides. On a 2-core machine shared with
other jobs, two OpenMP threads stall at every barrier whenever one core is taken (steps then vary
3-5× from one to the next); one thread per process keeps the comparison stable.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

from bench_report import command_line, machine_summary, markdown, update_benchmarks_md, workload_summary
from bench_serve import SERVE, run_serve, serve_markdown
from bench_workers import REAL_QWEN_FILES, RESULT_TAG, ROOT, WORKERS, WORKLOADS, median, workload_config


def prepare(out: Path, workloads: list[str], like: Path) -> None:
    """The models and synthetic datasets of the workloads (built once, reused): the small tiny
    model with 200-px data; a tiny-sized model of the real configuration (``models.tiny --like``)
    with 448-px pairs."""
    from data.synthetic import write_hpdv2, write_imagereward
    from models.tiny import build_like, build_tiny

    if not (out / "model" / "model.safetensors").exists():
        build_tiny(out / "model", seed=0, preset="small")
    if not (out / "hpdv2" / "synthetic.json").exists():
        write_hpdv2(out / "hpdv2", prompts=32, seed=0, task="colour", size=200)
    if not (out / "imagereward" / "synthetic.json").exists():
        write_imagereward(out / "imagereward", prompts=32, seed=0, task="colour", size=200)
    if "real" in workloads:
        if not (out / "like-model" / "model.safetensors").exists():
            build_like(out / "like-model", like, seed=0)
        if not (out / "hpdv2-448" / "synthetic.json").exists():
            write_hpdv2(out / "hpdv2-448", prompts=32, seed=0, task="colour", size=448)


def run(kind: str, a, **extra) -> dict:
    """One worker in a fresh process; returns its JSON result."""
    cmd = [sys.executable, str(Path(__file__).resolve()), "--worker", kind, "--out", str(a.out),
           "--workload", extra.pop("workload", "small"),
           "--threads", str(a.threads), "--warmup", str(extra.pop("warmup", a.warmup)),
           "--steps", str(extra.pop("steps", a.steps)), "--eval-groups", str(a.eval_groups),
           "--group-sizes", *map(str, a.group_sizes)]  # fmt: skip
    for k, v in extra.items():
        cmd += [f"--{k.replace('_', '-')}", str(v)]
    env = {**os.environ, "OMP_NUM_THREADS": str(a.threads), "MKL_NUM_THREADS": str(a.threads),
           "TOKENIZERS_PARALLELISM": "false", "HF_HUB_OFFLINE": "1", "PYTHONPATH": str(ROOT)}  # fmt: skip
    env.pop("MALLOC_MMAP_THRESHOLD_", None)
    if a.malloc_mmap_threshold:
        env["MALLOC_MMAP_THRESHOLD_"] = str(a.malloc_mmap_threshold)
    t0 = time.perf_counter()
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=ROOT)
    if proc.returncode != 0:
        raise SystemExit(f"bench worker {kind} {extra} failed:\n{proc.stderr[-4000:]}")
    lines = [x for x in proc.stdout.splitlines() if x.startswith(RESULT_TAG)]
    assert lines, f"worker {kind} printed no result:\n{proc.stdout[-2000:]}"
    print(f"  {kind} {extra or ''} done in {time.perf_counter() - t0:.0f} s", file=sys.stderr)
    return json.loads(lines[-1][len(RESULT_TAG) :])


def summarise(runs: list[dict], completions_per_step: int) -> dict:
    steps = [s for r in runs for s in r["step_s"]]
    cpu = [s for r in runs for s in r["step_cpu_s"]]
    out = {
        "median_step_s": median(steps),
        "median_step_cpu_s": median(cpu),
        "step_cpu_s": cpu,
        "completions_per_s": completions_per_step / median(steps),
        "peak_rss_mb": max(r["peak_rss_mb"] for r in runs),
        "setup_rss_mb": max(r["setup_rss_mb"] for r in runs),
        "step_s": steps,
        "completion_len_mean": [x for r in runs for x in r["completion_len_mean"]],
        "forward_calls_per_step": runs[-1]["forward_calls_per_step"],
    }
    if "phases_s" in runs[0]:
        out["phases_s"] = {k: median([r["phases_s"][k] for r in runs]) for k in runs[0]["phases_s"]}
    return out


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], epilog=__doc__.split("\n\n", 1)[1],
                                formatter_class=argparse.RawDescriptionHelpFormatter)  # fmt: skip
    p.add_argument(
        "--out", type=Path, default=ROOT / "runs" / "bench", help="folder for model, data and results"
    )
    p.add_argument("--quick", action="store_true", help="a smoke run: 1 step per side, G ∈ {2}, fp32 only")
    p.add_argument("--threads", type=int, default=1, help="torch threads per process, both sides (default 1)")
    p.add_argument(
        "--malloc-mmap-threshold",
        type=int,
        default=1 << 20,
        metavar="BYTES",
        help="glibc's MALLOC_MMAP_THRESHOLD_ for both sides (default 1 MiB; 0 leaves glibc's dynamic one)",
    )
    p.add_argument("--warmup", type=int, default=1, help="untimed steps at the start of every process")
    p.add_argument("--steps", type=int, default=3, help="timed steps per process")
    p.add_argument("--rounds", type=int, default=2, help="processes per side and precision (alternating)")
    p.add_argument("--precisions", nargs="+", default=["fp32", "bf16"], choices=["fp32", "bf16"])
    p.add_argument(
        "--workloads",
        nargs="+",
        default=["small", "real", SERVE],
        choices=sorted([*WORKLOADS, SERVE]),
        help="small: the tiny 'small' preset; real: the real 7B configuration shrunk (needs --like); "
        "serve: the judge's batched scoring and server latency (experiments/bench_serve.py)",
    )
    p.add_argument("--real-steps", type=int, default=2, help="timed steps per process, real workload")
    p.add_argument(
        "--real-rounds", type=int, default=2, help="processes per side and precision, real workload"
    )
    p.add_argument(
        "--like",
        type=Path,
        default=REAL_QWEN_FILES,
        help="the real Qwen2.5-VL-7B-Instruct files without weights (default ../shared/fixtures/...)",
    )
    p.add_argument("--group-sizes", nargs="+", type=int, default=[2, 4, 8, 16])
    p.add_argument("--eval-groups", type=int, default=8, help="prompts per evaluation throughput run")
    p.add_argument(
        "--headline-only", action="store_true", help="only ours vs TRL (no G sweep, LM head, eval)"
    )
    p.add_argument("--no-markdown", action="store_true", help="do not update the repository's BENCHMARKS.md")
    p.add_argument("--worker", choices=sorted(WORKERS), help=argparse.SUPPRESS)
    p.add_argument("--precision", default="fp32", help=argparse.SUPPRESS)
    p.add_argument("--share-prefix", default="true", help=argparse.SUPPRESS)
    p.add_argument("--workload", default="small", choices=sorted(WORKLOADS), help=argparse.SUPPRESS)
    a = p.parse_args(argv)
    a.out = a.out.resolve()

    if a.worker:
        import torch

        torch.set_num_threads(a.threads)
        a.share_prefix = a.share_prefix.lower() == "true"
        print(RESULT_TAG + json.dumps(WORKERS[a.worker](a)), flush=True)
        return

    if a.quick:
        a.warmup, a.steps, a.rounds, a.precisions, a.group_sizes, a.eval_groups = 0, 1, 1, ["fp32"], [2], 1
        a.real_steps, a.real_rounds = 1, 1
    if "real" in a.workloads and not (a.like / "config.json").is_file():
        print(f"skipping the real workload: {a.like} has no config.json (pass --like DIR)", file=sys.stderr)
        a.workloads = [w for w in a.workloads if w != "real"]
    a.out.mkdir(parents=True, exist_ok=True)
    grpo_workloads = [w for w in a.workloads if w != SERVE]
    if grpo_workloads:
        prepare(a.out, grpo_workloads, a.like)
    t_start = time.perf_counter()
    workloads = {}
    for workload in grpo_workloads:
        cfg = workload_config(a.out, workload)
        per_step = cfg.grpo.prompts_per_step * cfg.grpo.group_size
        rounds = a.rounds if workload == "small" else a.real_rounds
        steps = a.steps if workload == "small" else a.real_steps
        by_precision = {}
        for precision in a.precisions:
            print(
                f"{workload} {precision}: ours and TRL alternating, {rounds} process(es) each",
                file=sys.stderr,
            )
            runs = {"ours": [], "trl": []}
            for r in range(rounds):
                for side in ("ours", "trl") if r % 2 == 0 else ("trl", "ours"):
                    runs[side].append(run(side, a, precision=precision, workload=workload, steps=steps))
            ours, trl = summarise(runs["ours"], per_step), summarise(runs["trl"], per_step)
            by_precision[precision] = {
                "ours": ours, "trl": trl,
                "speedup": ours["completions_per_s"] / trl["completions_per_s"],
                "speedup_cpu_time": trl["median_step_cpu_s"] / ours["median_step_cpu_s"],
                "peak_rss_ratio": ours["peak_rss_mb"] / trl["peak_rss_mb"],
            }  # fmt: skip
        workloads[workload] = {"workload": workload_summary(cfg, workload), "protocol": {
            "warmup_steps_per_process": a.warmup, "timed_steps_per_process": steps,
            "processes_per_side_and_precision": rounds}, **by_precision}  # fmt: skip
    cfg = workload_config(a.out)
    by_precision = {k: v for k, v in workloads.get("small", {}).items() if k in ("fp32", "bf16")}
    groups = lm_head = evaluation = None
    sharing_real = None
    if not a.headline_only and "real" in a.workloads:
        print("real workload, checkpointing on: prefix sharing on/off", file=sys.stderr)
        sharing_real = run("groups", a, workload="real", group_sizes=8, warmup=0 if a.quick else 1,
                           steps=1 if a.quick else a.real_steps)  # fmt: skip
    if not a.headline_only and "small" in a.workloads:
        print("group sizes, prefix sharing on/off", file=sys.stderr)
        groups = run("groups", a, warmup=1 if not a.quick else 0, steps=2 if not a.quick else 1)
        lm_head = run("lm_head", a)
        print("evaluation throughput", file=sys.stderr)
        evaluation = run("eval", a)
    serve = run_serve(a.out, a.threads, a.quick) if SERVE in a.workloads else None
    head = by_precision.get(a.precisions[0], {})
    result = {
        "precision": a.precisions[0],
        "ours": head.get("ours"),
        "trl": head.get("trl"),
        "speedup": head.get("speedup"),
        "peak_rss_ratio": head.get("peak_rss_ratio"),
        "by_precision": by_precision,
        "workloads": {**workloads, SERVE: serve} if serve else workloads,
        "sharing_real": sharing_real,
        "group_sizes": groups,
        "lm_head": lm_head,
        "eval": evaluation,
        "workload": workload_summary(cfg, "small"),
        "machine": machine_summary(a.threads),
        "protocol": {
            "warmup_steps_per_process": a.warmup,
            "timed_steps_per_process": a.steps,
            "processes_per_side_and_precision": a.rounds,
            "malloc_mmap_threshold": a.malloc_mmap_threshold or "glibc default (dynamic)",
            "quick": a.quick,
        },  # fmt: skip
        "command": command_line(a),
        "wall_s": time.perf_counter() - t_start,
    }
    (a.out / "bench.json").write_text(json.dumps(result, indent=2) + "\n")
    table = markdown({**result, "workloads": workloads}) + (serve_markdown(serve) if serve else "")
    (a.out / "BENCHMARKS.md").write_text(table)
    if not (a.no_markdown or a.quick or a.headline_only):
        update_benchmarks_md(ROOT / "BENCHMARKS.md", table)
    print(table)


if __name__ == "__main__":
    main()
