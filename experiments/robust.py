"""Does ``make demo`` learn whatever the seed and the machine? ``python experiments/robust.py --out runs/robust``
(``make demo-robust``).

Runs the demo (``experiments/demo.py``) over a grid of data seeds × perturbations that stand in
for other machines, and reports per half how many runs meet its targets, with the spread of the
figures. A result that depends on the host's rounding is not a result: float rounding differs
between CPUs (AVX-512, AVX2 only, AMX) and thread counts, and the demo's learning must not hang on
it. The perturbations:

- ``base``: one torch thread per half, the kernels torch picks for this CPU;
- ``threads2``: two torch threads per half (other reduction orders in the matrix products);
- ``avx2``: ``ATEN_CPU_CAPABILITY=avx2`` and ``MKL_ENABLE_INSTRUCTIONS=AVX2``, the kernels of a CPU
  without AVX-512 (each rounds differently; on a host without AVX-512 it is the same as base);
- ``ulps``: every initial weight moved by about 2 float32 ulps (``demo.py --perturb-ulps 2``).

The default grid is 10 runs: seeds 1–5, each under two perturbations, each perturbation on at
least two seeds. ``--parallel`` runs go at a time (the default, 1, suits two cores: each run
takes one core per half); a run whose ``report.json`` exists is read, not run again (``--fresh`` runs it anyway), so
an interrupted grid continues. Writes ``OUT/robust.json`` and ``OUT/robust.md`` (the table of
``docs/demo.md``), each run's folder under ``OUT/runs/``.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run as a script from anywhere

from experiments.demo_report import pair_targets, rating_targets  # noqa: E402

DEMO = Path(__file__).resolve().parent / "demo.py"
PERTURBATIONS = {  # name → (extra demo.py arguments, extra environment)
    "base": ([], {}),
    "threads2": (["--threads", "2", "--jobs", "1"], {}),  # the halves one after the other: 2 threads, 2 cores
    "avx2": ([], {"ATEN_CPU_CAPABILITY": "avx2", "MKL_ENABLE_INSTRUCTIONS": "AVX2"}),
    "ulps": (["--perturb-ulps", "2", "--perturb-seed", "1"], {}),
}
GRID = [(1, "base"), (1, "avx2"), (2, "threads2"), (2, "ulps"), (3, "base"),
        (3, "avx2"), (4, "threads2"), (4, "ulps"), (5, "avx2"), (5, "ulps")]  # fmt: skip
FIGURES = {  # per half: the report key and the figures the table shows
    "rating": ("imagereward", ("soft", "hard")),
    "pairs": ("hpsv2", ("soft", "pair_accuracy")),
}
TARGETS = {"rating": rating_targets, "pairs": pair_targets}


def host() -> str:
    """The CPU model and its widest vector extensions, for the table's heading."""
    flags, model = set(), platform.processor() or "unknown CPU"
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
            elif line.startswith("flags"):
                flags = set(line.split(":", 1)[1].split())
    except OSError:
        pass
    ext = [f for f in ("avx2", "avx512f", "avx512_bf16", "amx_bf16") if f in flags]
    return f"{model}, {os.cpu_count()} cores, {' '.join(ext) or 'no AVX2'}"


def run(out: Path, seed: int, perturbation: str, halves: list[str], fresh: bool) -> dict:
    """One demo run (or its existing report); returns its report."""
    folder = out / "runs" / f"seed{seed}-{perturbation}"
    report_path = folder / "report.json"
    if report_path.exists() and not fresh:
        report = json.loads(report_path.read_text())
        if all(FIGURES[h][0] in report for h in halves):
            print(f"seed {seed}, {perturbation}: read {report_path}", flush=True)
            return report
    args, env = PERTURBATIONS[perturbation]
    cmd = [sys.executable, str(DEMO), "--out", str(folder), "--seed", str(seed), "--halves", *halves, *args]
    folder.mkdir(parents=True, exist_ok=True)
    print(f"seed {seed}, {perturbation}: {' '.join(cmd[1:])}", flush=True)
    t0 = time.perf_counter()
    with (folder / "demo.log").open("w") as log:
        proc = subprocess.run(cmd, stdout=log, stderr=subprocess.STDOUT, env={**os.environ, **env})
    if proc.returncode:
        raise SystemExit(
            f"error: seed {seed}, {perturbation} failed (exit {proc.returncode}); see {folder / 'demo.log'}"
        )
    print(f"  done in {time.perf_counter() - t0:.0f} s", flush=True)
    return json.loads(report_path.read_text())


def row(seed: int, perturbation: str, report: dict, half: str) -> dict:
    key, names = FIGURES[half]
    part = report[key]
    met = TARGETS[half](part)
    return {
        "seed": seed,
        "perturbation": perturbation,
        **{f"{stage}_{name}": part[stage][name] for stage in ("zero_shot", "trained") for name in names},
        "kept_step": part["kept_step"],
        "cold_steps": part["cold_start"]["learn_steps"],
        "met": all(met.values()),
        "missed": [name for name, ok in met.items() if not ok],
        "wall_seconds": part["wall_seconds"],
    }


def spread(values: list[float]) -> dict:
    return {
        "mean": statistics.fmean(values),
        "sd": statistics.pstdev(values),
        "min": min(values),
        "max": max(values),
    }


def markdown(result: dict) -> str:
    lines = [f"Measured {result['date']} on {result['host']}; `python experiments/robust.py` "
             f"({len(result['grid'])} runs).", ""]  # fmt: skip
    for half, rows in result["halves"].items():
        names = FIGURES[half][1]
        lines += [f"**{half}**: {result['summary'][half]['met']} of {len(rows)} runs meet every target.", ""]
        head = " | ".join(f"{n} zero-shot → trained" for n in names)
        lines += [f"| seed | perturbation | {head} | kept step | cold steps | targets |",
                  "|---|---|" + "---|" * len(names) + "---|---|---|"]  # fmt: skip
        for r in rows:
            cells = " | ".join(f"{r[f'zero_shot_{n}']:.3f} → {r[f'trained_{n}']:.3f}" for n in names)
            verdict = "met" if r["met"] else "missed: " + "; ".join(r["missed"])
            lines.append(
                f"| {r['seed']} | {r['perturbation']} | {cells} | {r['kept_step']} | {r['cold_steps']} | {verdict} |"
            )
        stats = result["summary"][half]
        lines += [""] + [
            f"- trained {n}: mean {s['mean']:.3f}, sd {s['sd']:.3f}, range {s['min']:.3f}–{s['max']:.3f}"
            for n, s in stats["trained"].items()
        ] + [""]  # fmt: skip
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(
        prog="python experiments/robust.py",
        description=__doc__.split("\n\n")[0],
        epilog=__doc__.split("\n\n", 1)[1],
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    ap.add_argument("--out", type=Path, default=Path("runs/robust"), help="output folder")
    ap.add_argument("--halves", nargs="+", choices=("rating", "pairs"), default=["rating", "pairs"])
    ap.add_argument("--runs", nargs="+", metavar="SEED:PERTURBATION",
                    help=f"the grid to run (default: {' '.join(f'{s}:{p}' for s, p in GRID)})")  # fmt: skip
    ap.add_argument("--fresh", action="store_true", help="run again even where a report exists")
    ap.add_argument("--parallel", type=int, default=1,
                    help="demo runs at a time (each takes one core per half it runs)")  # fmt: skip
    args = ap.parse_args(argv)
    grid = GRID
    if args.runs:
        grid = [(int(s), p) for s, _, p in (r.partition(":") for r in args.runs)]
        unknown = {p for _, p in grid} - set(PERTURBATIONS)
        if unknown:
            ap.error(f"unknown perturbation(s) {sorted(unknown)}; known: {sorted(PERTURBATIONS)}")
    with ThreadPoolExecutor(args.parallel) as pool:  # each worker waits on one demo process
        futures = [pool.submit(run, args.out, seed, p, args.halves, args.fresh) for seed, p in grid]
        reports = [(seed, p, f.result()) for (seed, p), f in zip(grid, futures, strict=True)]

    halves = {h: [row(s, p, rep, h) for s, p, rep in reports] for h in args.halves}
    result = {
        "date": time.strftime("%Y-%m-%d"),
        "host": host(),
        "grid": [f"{s}:{p}" for s, p in grid],
        "halves": halves,
        "summary": {
            h: {
                "met": sum(r["met"] for r in rows),
                "trained": {n: spread([r[f"trained_{n}"] for r in rows]) for n in FIGURES[h][1]},
            }
            for h, rows in halves.items()
        },  # fmt: skip
    }
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "robust.json").write_text(json.dumps(result, indent=2) + "\n")
    text = markdown(result)
    (args.out / "robust.md").write_text(text + "\n")
    print("\n" + text)
    return 0 if all(r["met"] for rows in halves.values() for r in rows) else 1


if __name__ == "__main__":
    sys.exit(main())
