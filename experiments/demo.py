"""The whole method end to end on CPU: ``python experiments/demo.py --out runs/demo`` (``make demo``).

The same code a GPU user runs on Qwen2.5-VL-7B and ImageRewardDB / HPDv2, on tiny Qwen2.5-VL
models built offline and on synthetic data written in the published layouts (``data/synthetic.py``
documents the hidden ground truth: the drawn colour sets the quality through a permutation drawn
from ``--seed``). Two independent halves, run side by side (``--jobs 2``, one process each):

- **ratings** (ImageRewardDB format, ImageReward protocol): the ``tiny`` model;
- **pairs** (HPDv2 format, anchor-based ranking under the HPSv2 protocol): the ``tiny-pairs`` model.

Each half: a supervised **cold start** (``grpo.coldstart``) teaches the answer format with the
answers of a *taste*, an opinion about the colours that orders exactly half of the colour pairs
as the hidden preference does (so every seed starts at chance, as the paper's zero-shot model
does); it stops once the answers follow the images, and the pairs half then calibrates the taste
to about 80% confidence so that GRPO's groups disagree. Then the zero-shot evaluation on the test
split (hard and soft scores, Mean@1 and Mean@3), GRPO (``experiments/tiny.yaml``,
``experiments/tiny_hpsv2.yaml``) with held-out evaluation every ``--eval-every`` steps and the
best held-out model kept, and the trained model's evaluation. ``docs/demo.md`` has the design and
the measurements behind it, including how robust it is across seeds and machines
(``experiments/robust.py``, ``make demo-robust``).

Writes ``OUT/report.json`` (``imagereward.{zero_shot,trained}.{hard,soft,hard_mean3,soft_mean3}``,
``hpsv2.{zero_shot,trained}.{hard,soft,soft_mean3,pair_accuracy}``, ``hpsv2.ceiling``, each half's
cold start and ``kept_step``, ``targets_met``, ``wall_seconds``), ``OUT/summary.md``,
``OUT/reward_curve.png``, each half's log (``OUT/rating.log``, ``OUT/pairs.log``) and every
stage's own folder (models, data, runs with ``metrics.jsonl``, evaluation reports).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run as a script from anywhere

from experiments.demo_report import ACC_KEY, check_targets, plot_curves, summary  # noqa: E402

STAGE_DIRS = {  # what each half writes under OUT: removed before it runs, so nothing is resumed
    "rating": (
        "cold-imagereward",
        "grpo-imagereward",
        "eval/imagereward-zero-shot",
        "eval/imagereward-trained",
    ),
    "pairs": ("cold-hpdv2", "grpo-hpdv2", "eval/hpdv2-zero-shot", "eval/hpdv2-trained"),
    "stretch": ("stretch",),
}
REPORT_KEY = {"rating": "imagereward", "pairs": "hpsv2", "stretch": "stretch"}
GRPO_RUN = {
    "rating": ("grpo-imagereward", "imagereward"),
    "pairs": ("grpo-hpdv2", "hpdv2"),
}  # folder, data kind


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(
        prog="python experiments/demo.py",
        description=__doc__.split("\n\n")[0],
        epilog=__doc__.split("\n\n", 1)[1],
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    ap.add_argument("--out", type=Path, default=Path("runs/demo"), help="output folder")
    ap.add_argument("--seed", type=int, default=1, help="data seed: sets the colour→quality mapping")
    ap.add_argument("--threads", type=int, default=int(os.environ.get("DEMO_THREADS", "1")),
                    help="torch threads per half (tiny matrices: 1 is fastest with the halves side by side)")  # fmt: skip
    ap.add_argument("--jobs", type=int, choices=(1, 2), default=2,
                    help="2: the halves run side by side as two processes; 1: one after the other")  # fmt: skip
    ap.add_argument("--halves", nargs="+", choices=("rating", "pairs"), default=["rating", "pairs"],
                    help="which halves to run (the report holds those)")  # fmt: skip
    ap.add_argument("--prompts", type=int, default=256, help="synthetic train prompts per dataset")
    ap.add_argument("--taste-seed", type=int, default=None,
                    help="seed of the cold start's taste (default: the first whose order of the colours is at chance)")  # fmt: skip
    ap.add_argument("--cold-seed", type=int, default=0, help="seed of the cold starts' batches")
    ap.add_argument("--steps", type=int, default=400, help="GRPO steps of the rating half")
    ap.add_argument("--pair-steps", type=int, default=400, help="GRPO steps of the pairs half")
    ap.add_argument(
        "--eval-every", type=int, default=50, help="held-out evaluation during GRPO every N steps"
    )
    ap.add_argument("--max-new-tokens", type=int, default=24, help="completion length at evaluation")
    ap.add_argument("--perturb-ulps", type=float, default=0.0,
                    help="move every initial weight by about this many float32 ulps (another machine's rounding)")  # fmt: skip
    ap.add_argument("--perturb-seed", type=int, default=0, help="seed of --perturb-ulps' noise")
    ap.add_argument("--stretch", action="store_true",
                    help="also run the prompt-conditioned tier with the small preset (make demo-full)")  # fmt: skip
    ap.add_argument("--stretch-steps", type=int, default=600, help="GRPO steps of the stretch run")
    ap.add_argument(
        "--only", choices=("rating", "pairs", "stretch"), help=argparse.SUPPRESS
    )  # one half, in-process
    return ap.parse_args(argv)


def run_half(half: str, args) -> dict:
    """One half in this process; writes ``OUT/<half>.json`` and returns it."""
    import torch

    from experiments.demo_pipeline import HALVES

    torch.set_num_threads(args.threads)
    for name in STAGE_DIRS[half]:
        shutil.rmtree(args.out / name, ignore_errors=True)
    part = HALVES[half](args, args.out)
    (args.out / f"{half}.json").write_text(json.dumps(part, indent=2) + "\n")
    return part


def run_side_by_side(halves: list[str], argv: list[str], out: Path) -> None:
    """Each half in its own process, its output in ``OUT/<half>.log``; the stage lines are echoed
    here as they come. Raises if a half fails, naming its log."""
    procs = {}
    for half in halves:
        log = (out / f"{half}.log").open("w")
        cmd = [sys.executable, str(Path(__file__).resolve()), *argv, "--only", half]
        procs[half] = (subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env={**os.environ, "PYTHONUNBUFFERED": "1"}), log)  # fmt: skip
        print(f"{half} half: running, its log is {out / f'{half}.log'}", flush=True)
    echoed = dict.fromkeys(halves, 0)
    while procs:
        time.sleep(2)
        for half, (proc, log) in list(procs.items()):
            lines = (out / f"{half}.log").read_text(errors="replace").replace("\r", "\n").splitlines()
            for line in lines[echoed[half] :]:
                if line.startswith(("== [", "keeping the model", "WARNING", "TARGETS", "cold start:")):
                    print(line, flush=True)
            echoed[half] = len(lines)
            if proc.poll() is not None:
                log.close()
                del procs[half]
                if proc.returncode:
                    for other, _ in procs.values():
                        other.terminate()
                    tail = "\n".join(lines[-30:])
                    raise SystemExit(
                        f"{tail}\nerror: the {half} half failed (exit {proc.returncode}); see {out / f'{half}.log'}"
                    )


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    args = parse_args(argv)
    args.out.mkdir(parents=True, exist_ok=True)
    if args.only:
        run_half(args.only, args)
        return 0
    t0 = time.perf_counter()
    halves = list(args.halves)
    if args.jobs == 2 and len(halves) == 2:
        run_side_by_side(halves, argv, args.out)
    else:
        for half in halves:
            run_half(half, args)
    wall = time.perf_counter() - t0
    if args.stretch:
        run_half("stretch", args)

    report = {REPORT_KEY[h]: json.loads((args.out / f"{h}.json").read_text()) for h in halves}
    report |= {"seed": args.seed, "threads": args.threads, "jobs": args.jobs, "perturb_ulps": args.perturb_ulps,
               "kernels": {k: os.environ.get(k) for k in ("ATEN_CPU_CAPABILITY", "MKL_ENABLE_INSTRUCTIONS")},
               "wall_seconds": round(wall, 1)}  # fmt: skip
    if args.stretch:
        report["stretch"] = json.loads((args.out / "stretch.json").read_text())
    report["targets_met"] = check_targets(report)
    (args.out / "report.json").write_text(json.dumps(report, indent=2) + "\n")
    curves = {f"GRPO, {h}": (args.out / GRPO_RUN[h][0], ACC_KEY[GRPO_RUN[h][1]], report[REPORT_KEY[h]]["kept_step"])
              for h in halves}  # fmt: skip
    plot_curves(curves, args.out / "reward_curve.png")
    text = summary(report, args.out)
    (args.out / "summary.md").write_text(text)
    print("\n" + text)
    print(f"wrote {args.out / 'report.json'}, {args.out / 'summary.md'} and {args.out / 'reward_curve.png'}")
    missed = [name for name, ok in report["targets_met"].items() if not ok]
    if missed:
        print(f"TARGETS MISSED: {missed} (see report.json)", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
