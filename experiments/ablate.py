"""Which GRPO variant teaches the visual judge best: ``python experiments/ablate.py --out runs/ablate`` (``make ablate``).

The two synthetic tasks of ``make demo`` (``experiments/demo_pipeline.py``: ratings of single
images under the ImageReward protocol, pairs ranked with an anchor under the HPSv2 protocol), the
same tiny models, data and cold starts, trained with GRPO under each variant of the objective
(``VARIANTS``: the paper's GRPO, Dr. GRPO, DAPO, batch-scaled advantages, GSPO, GRPO with dynamic
sampling) on several seeds. Each seed sets the hidden colour → quality mapping, the cold start's
neutral taste and the training order, as ``experiments/demo.py --seed`` does; the variants of one
seed start from the same cold-started model.

Reported per task and variant, as mean ± std over the seeds: held-out soft accuracy (Mean@1, the
evaluation logged during training every ``--eval-every`` steps) at the step budgets
``--budgets``, the steps until it first reaches the demo's target for the trained model
(``experiments/demo_report.py``: 0.80 for ratings, 0.75 for pairs; here on the held-out split,
not test), the fraction of groups with zero reward spread (``frac_reward_zero_std``) and, with
dynamic sampling, the extra rollouts per step. A difference from the paper's GRPO is called larger
than the seed spread when it exceeds the sum of the two standard deviations.

All variants run at μ = ``--ppo-epochs`` (default 2) update passes per batch: at μ = 1 the
ratio π_θ/π_θold is exactly 1, so clip-higher and GSPO's sequence ratio change nothing.

Writes ``OUT/table.md`` (the markdown table and the comparisons), ``OUT/ablate.json`` (every
figure), ``OUT/ablate.png`` (held-out accuracy and zero-spread fraction per step, mean over
seeds) and one folder per task, seed and variant with its ``metrics.jsonl`` and ``result.json``.
A run whose ``result.json`` holds the same settings is not run again (``--fresh`` reruns
everything), so an interrupted grid continues where it stopped. The full grid is 36 runs of 400 steps (6 variants ×
3 seeds × 2 tasks), two at a time, after 6 cold starts: measured at 1.7–2.3 s per step (μ = 2)
while other jobs loaded the same 2 cores (load average 6–8), about 4 h at that load; the demo's
idle step time puts it near 2 h on 2 idle cores. ``--variants`` and ``--steps`` trim it; it is
not part of ``make test``. ``--quick`` runs a few steps of each chosen run to prove the pipeline.
"""

from __future__ import annotations

import argparse
import json
import shutil
import statistics
import sys
import time
from concurrent.futures import ProcessPoolExecutor
from multiprocessing import get_context
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run as a script from anywhere

from experiments.demo_report import ACC_KEY, PAIR_TARGETS, RATING_TARGETS  # noqa: E402

# Every variant starts from the paper's GRPO: the demo's experiment files sample dynamically
# (docs/demo.md), so that is switched off first and each variant adds its own settings.
PAPER = ("grpo.dynamic_sampling=false",)
# name → overrides of grpo.train on top of PAPER and the demo's experiment file (docs/math.md has the formulas)
VARIANTS = {
    "grpo": (),  # the paper's: seq-mean, group std, symmetric clip, token ratio
    "dr_grpo": ("grpo.loss_type=dr_grpo",),  # arXiv 2503.20783: no std, constant normaliser
    "dapo": ("grpo.loss_type=dapo", "grpo.clip_eps_high=0.28", "grpo.dynamic_sampling=true"),  # arXiv 2503.14476
    "bnpo": ("grpo.loss_type=bnpo",),  # token mean, the batch's std (arXiv 2508.08221)
    "gspo": ("grpo.importance_sampling_level=sequence", "grpo.clip_eps=3e-4", "grpo.clip_eps_high=4e-4"),  # arXiv 2507.18071 §5.1
    "grpo_ds": ("grpo.dynamic_sampling=true",),  # the paper's objective with DAPO's dynamic sampling
}  # fmt: skip
TASKS = {  # task → (experiment file, data kind, the demo's target for the trained model's soft accuracy)
    "rating": ("tiny.yaml", "imagereward", RATING_TARGETS["trained_soft_min"]),
    "pairs": ("tiny_hpsv2.yaml", "hpdv2", PAIR_TARGETS["trained_soft_min"]),
}
QUICK = {"steps": 4, "eval_every": 2, "budgets": [2, 4], "prompts": 32, "cold_steps": 30}


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(
        prog="python experiments/ablate.py",
        description=__doc__.split("\n\n")[0],
        epilog=__doc__.split("\n\n", 1)[1],
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    ap.add_argument("--out", type=Path, default=Path("runs/ablate"), help="output folder")
    ap.add_argument(
        "--variants", nargs="+", choices=list(VARIANTS), default=list(VARIANTS), help="variants to train"
    )
    ap.add_argument("--seeds", nargs="+", type=int, default=[1, 2, 3], help="data and training seeds")
    ap.add_argument("--tasks", nargs="+", choices=list(TASKS), default=list(TASKS), help="which tasks")
    ap.add_argument("--steps", type=int, default=400, help="GRPO steps of every run (the demo's: 400)")
    ap.add_argument("--eval-every", type=int, default=50, help="held-out evaluation every N steps")
    ap.add_argument("--budgets", nargs="+", type=int, default=[100, 200, 400],
                    help="step budgets of the table (multiples of --eval-every)")  # fmt: skip
    ap.add_argument("--ppo-epochs", type=int, default=2, help="μ, update passes per batch, for every variant")
    ap.add_argument("--prompts", type=int, default=256, help="synthetic train prompts per dataset")
    ap.add_argument("--cold-seed", type=int, default=0, help="seed of the cold starts' batches")
    ap.add_argument("--jobs", type=int, default=2, help="runs side by side, one process each")
    ap.add_argument("--threads", type=int, default=1, help="torch threads per run")
    ap.add_argument(
        "--quick", action="store_true", help=f"a few steps of everything ({QUICK}), to prove the pipeline"
    )
    ap.add_argument(
        "--fresh", action="store_true", help="rerun runs that already have a result of the same settings"
    )
    args = ap.parse_args(argv)
    if args.quick:
        args.steps, args.eval_every, args.budgets, args.prompts = (QUICK[k] for k in ("steps", "eval_every", "budgets", "prompts"))  # fmt: skip
    bad = [b for b in args.budgets if b % args.eval_every or b > args.steps]
    if bad:
        ap.error(
            f"--budgets {bad} must be multiples of --eval-every {args.eval_every} and at most --steps {args.steps}"
        )
    return args


# ------------------------------------------------------------------------------ one process each


def prepare(task: str, seed: int, args) -> str:
    """The tiny model, the synthetic data and the cold start of one task and seed (the demo's);
    returns the folder of the cold-started model. Kept and reused when made with the same settings."""
    import torch

    from data.hpdv2 import read_train as read_hpdv2_train
    from data.imagereward import read_train as read_ir_train
    from data.synthetic import write_hpdv2, write_imagereward
    from experiments.demo_pipeline import (
        HELD_OUT_DRAW,
        PAIR_PRESET,
        build_model,
        cold_settings,
        neutral_taste_seed,
    )
    from grpo.coldstart import cold_start

    torch.set_num_threads(args.threads)
    work = args.out / task / f"seed{seed}"
    cold_dir, stamp_file = work / "cold", work / "prepared.json"
    stamp = {"prompts": args.prompts, "cold_seed": args.cold_seed, "quick": args.quick}
    if not args.fresh and stamp_file.exists() and json.loads(stamp_file.read_text()) == stamp:
        return str(cold_dir)
    shutil.rmtree(work, ignore_errors=True)
    half = "rating" if task == "rating" else "pairs"
    settings = cold_settings(argparse.Namespace(cold_seed=args.cold_seed), half, neutral_taste_seed(seed))
    if args.quick:
        settings |= {"steps": QUICK["cold_steps"], "calibrate_steps": min(settings["calibrate_steps"], 10)}
    if task == "rating":
        model = build_model(work / "model", "tiny", 0.0, 0)
        write_imagereward(work / "data", prompts=args.prompts, seed=seed)
        train_set = read_ir_train(work / "data")
    else:
        model = build_model(work / "model", PAIR_PRESET, 0.0, 0)
        write_hpdv2(work / "data", prompts=args.prompts, seed=seed)
        write_hpdv2(work / "held-out", prompts=64, seed=seed, draw_seed=HELD_OUT_DRAW + seed)
        train_set = read_hpdv2_train(work / "data", 1.0)
    cold_start(str(model), train_set, str(cold_dir), progress=False, **settings)
    stamp_file.write_text(json.dumps(stamp) + "\n")  # last: the folder is whole
    return str(cold_dir)


def train_variant(task: str, seed: int, variant: str, cold_dir: str, args) -> dict:
    """GRPO of one variant from the cold-started model; writes and returns its ``result.json``."""
    import torch

    from experiments.demo_pipeline import grpo_run

    torch.set_num_threads(args.threads)
    work = args.out / task / f"seed{seed}"
    run = work / variant
    shutil.rmtree(run, ignore_errors=True)
    config, kind, _ = TASKS[task]
    extra = tuple(run_settings(variant, args)["overrides"])
    run_args = argparse.Namespace(seed=seed, eval_every=args.eval_every)
    t0 = time.perf_counter()
    grpo_run(config, Path(cold_dir), work / "data", run, args.steps, run_args,
             held_out=work / "held-out" if task == "pairs" else None, extra=extra)  # fmt: skip
    result = summarise(run / "metrics.jsonl", ACC_KEY[kind], TASKS[task][2])
    result |= {"task": task, "seed": seed, "variant": variant, "settings": run_settings(variant, args),
               "wall_seconds": round(time.perf_counter() - t0, 1)}  # fmt: skip
    for checkpoint in run.glob("checkpoint-*"):  # the figures are in metrics.jsonl, no weights are kept
        shutil.rmtree(checkpoint)
    (run / "result.json").write_text(json.dumps(result, indent=2) + "\n")
    return result


def run_settings(variant: str, args) -> dict:
    """What a run's figures depend on besides task and seed: a saved result is reused only when
    these match (a --quick run never stands in for a full one)."""
    overrides = [
        "train.save_every=0",
        "train.keep_last=1",
        f"grpo.ppo_epochs={args.ppo_epochs}",
        *PAPER,
        *VARIANTS[variant],
    ]
    return {"overrides": overrides, "steps": args.steps, "eval_every": args.eval_every, "prompts": args.prompts,
            "cold_seed": args.cold_seed, "quick": args.quick}  # fmt: skip


def summarise(metrics: Path, acc_key: str, target: float) -> dict:
    """The figures of one run from its ``metrics.jsonl``."""
    rows = [json.loads(line) for line in metrics.read_text().splitlines()]
    evals = {str(r["step"]): r[acc_key] for r in rows if r.get(acc_key) is not None}  # str keys, as in JSON
    reached = [int(step) for step, acc in evals.items() if acc >= target]
    extra = [r["dynamic_sampling/extra_rollouts"] for r in rows if "dynamic_sampling/extra_rollouts" in r]
    return {
        "held_out_soft": evals,
        "steps_to_target": min(reached) if reached else None,
        "frac_reward_zero_std": statistics.fmean(r["frac_reward_zero_std"] for r in rows),
        "frac_reward_zero_std_per_step": [r["frac_reward_zero_std"] for r in rows],
        "extra_rollouts_per_step": statistics.fmean(extra) if extra else 0.0,
        "budget_exhausted_frac": statistics.fmean(r["dynamic_sampling/budget_exhausted"] for r in rows) if extra else 0.0,
        "seconds_per_step": statistics.fmean(sum(v for k, v in r.items() if k.startswith("time/")) for r in rows),
    }  # fmt: skip


# ---------------------------------------------------------------------------------- the report


def mean_std(values: list[float]) -> tuple[float, float]:
    return statistics.fmean(values), (statistics.stdev(values) if len(values) > 1 else 0.0)


def table(results: list[dict], args) -> str:
    """The markdown table (mean ± std over seeds) and, per task, how each variant compares with the
    paper's GRPO at the largest budget."""
    lines = [f"Held-out soft accuracy (Mean@1) after N GRPO steps, mean ± std over seeds {args.seeds}; "
             f"μ = {args.ppo_epochs}; steps to the demo's target (seeds that reached it); share of groups "
             "with zero reward spread; extra rollouts per step (dynamic sampling).", ""]  # fmt: skip
    head = [
        "task",
        "variant",
        *[f"acc@{b}" for b in args.budgets],
        "steps to target",
        "frac_reward_zero_std",
        "extra rollouts/step",
    ]
    lines += ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    verdicts = []
    for task in args.tasks:
        base = None
        for variant in args.variants:
            rs = [r for r in results if r["task"] == task and r["variant"] == variant]
            if not rs:
                continue
            accs = {b: mean_std([r["held_out_soft"][str(b)] for r in rs]) for b in args.budgets}
            reached = [r["steps_to_target"] for r in rs if r["steps_to_target"] is not None]
            to_target = (
                f"{statistics.fmean(reached):.0f} ({len(reached)}/{len(rs)})"
                if reached
                else f"— (0/{len(rs)})"
            )
            zero = mean_std([r["frac_reward_zero_std"] for r in rs])
            extra = statistics.fmean(r["extra_rollouts_per_step"] for r in rs)
            cells = [task, variant, *[f"{m:.3f} ± {s:.3f}" for m, s in accs.values()], to_target,
                     f"{zero[0]:.2f} ± {zero[1]:.2f}", f"{extra:.1f}" if extra else "—"]  # fmt: skip
            lines.append("| " + " | ".join(cells) + " |")
            last = accs[args.budgets[-1]]
            if variant == "grpo":
                base = last
            elif base is not None:
                delta, spread = last[0] - base[0], last[1] + base[1]
                size = "larger than" if abs(delta) > spread else "within"
                if len(args.seeds) < 2:
                    size = "one seed, so no spread to compare with:"
                verdicts.append(f"- {task}, {variant} vs grpo at {args.budgets[-1]} steps: {delta:+.3f}, {size} the "
                                f"seed spread (±{spread:.3f}).")  # fmt: skip
    if verdicts:
        lines += ["", "Compared with the paper's GRPO (a difference is larger than the seed spread when it exceeds "
                      "the sum of the two standard deviations):", "", *verdicts]  # fmt: skip
    return "\n".join(lines) + "\n"


def plot(results: list[dict], args, path: Path) -> None:
    """Held-out accuracy per evaluation and the zero-spread fraction per step (20-step mean), mean over seeds."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    fig, axes = plt.subplots(2, len(args.tasks), figsize=(6 * len(args.tasks), 7), squeeze=False)
    for col, task in enumerate(args.tasks):
        for i, variant in enumerate(args.variants):
            rs = [r for r in results if r["task"] == task and r["variant"] == variant]
            if not rs:
                continue
            steps = sorted(int(s) for s in rs[0]["held_out_soft"])
            acc = np.array([[r["held_out_soft"][str(s)] for s in steps] for r in rs])  # (seeds, evals)
            axes[0, col].plot(steps, acc.mean(0), "o-", color=f"C{i}", label=variant)
            axes[0, col].fill_between(steps, acc.min(0), acc.max(0), color=f"C{i}", alpha=0.15)
            zero = np.array([r["frac_reward_zero_std_per_step"] for r in rs]).mean(0)  # (steps,)
            w = min(20, len(zero))
            smooth = np.convolve(zero, np.ones(w) / w, mode="valid")  # (steps − w + 1,)
            axes[1, col].plot(np.arange(w, len(zero) + 1), smooth, ".-", color=f"C{i}", label=variant)
        axes[0, col].axhline(TASKS[task][2], color="0.5", ls=":", label="demo target")
        axes[0, col].set(
            title=f"{task}: held-out soft accuracy (mean, min–max over seeds)",
            xlabel="GRPO step",
            ylim=(0, 1),
        )
        axes[1, col].set(
            title=f"{task}: frac_reward_zero_std ({w}-step mean)", xlabel="GRPO step", ylim=(0, 1.05)
        )
        axes[0, col].legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    args.out.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    pairs = [(task, seed) for task in args.tasks for seed in args.seeds]
    with ProcessPoolExecutor(max_workers=args.jobs, mp_context=get_context("spawn")) as pool:
        cold = dict(zip(pairs, pool.map(prepare, *zip(*pairs), [args] * len(pairs)), strict=True))
        print(f"cold starts ready ({time.perf_counter() - t0:.0f} s)", flush=True)
        jobs = {}
        for (task, seed), cold_dir in cold.items():
            for variant in args.variants:
                done = args.out / task / f"seed{seed}" / variant / "result.json"
                if (
                    not args.fresh
                    and done.exists()
                    and json.loads(done.read_text())["settings"] == run_settings(variant, args)
                ):
                    jobs[(task, seed, variant)] = None
                else:
                    jobs[(task, seed, variant)] = pool.submit(
                        train_variant, task, seed, variant, cold_dir, args
                    )
        results = []
        for (task, seed, variant), future in jobs.items():
            result = (
                future.result()
                if future
                else json.loads((args.out / task / f"seed{seed}" / variant / "result.json").read_text())
            )
            print(f"{task} seed {seed} {variant}: held-out soft {result['held_out_soft']}, "
                  f"frac_reward_zero_std {result['frac_reward_zero_std']:.2f}", flush=True)  # fmt: skip
            results.append(result)
    text = table(results, args)
    (args.out / "table.md").write_text(text)
    wall = round(time.perf_counter() - t0, 1)
    (args.out / "ablate.json").write_text(json.dumps({"args": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()},
                                                      "wall_seconds": wall, "runs": results}, indent=2) + "\n")  # fmt: skip
    plot(results, args, args.out / "ablate.png")
    print("\n" + text)
    print(
        f"wrote {args.out / 'table.md'}, {args.out / 'ablate.json'} and {args.out / 'ablate.png'} in {wall:.0f} s"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
