"""What ``make demo`` reports: the figures of each evaluation, the pairwise extras (pair accuracy
against the hidden quality, the anchor protocol's ceiling), the targets, the summary table (the
shape of the paper's Tables 1–2, built by ``experiments/tables.py``) and the reward curves."""

from __future__ import annotations

import json
from pathlib import Path

from eval.metrics import hpsv2_accuracy
from experiments.tables import table1, table2

# The bar each half must clear on its test split. Rating half: the ImageReward protocol.
RATING_TARGETS = {
    "trained_soft_min": 0.80,
    "soft_gain_min": 0.15,  # trained soft − zero-shot soft
    "hard_gain_min": 0.15,  # trained hard − zero-shot hard
}
# Pairs half: the HPSv2 protocol with anchor ranking, and pair accuracy against the hidden quality.
PAIR_TARGETS = {
    "pair_accuracy_min": 0.90,
    "trained_soft_min": 0.75,
    "soft_gain_min": 0.15,
}
WALL_SECONDS_MAX = 15 * 60  # make demo, both halves, on 2 cores
ACC_KEY = {  # the metrics.jsonl key of each run's held-out accuracy (Mean@1 soft scores)
    "imagereward": "eval/metrics/soft@1/imagereward_accuracy",
    "hpdv2": "eval/metrics/soft@1/hpsv2_accuracy",
}


def figures(report: dict, protocol: str, **extra) -> dict:
    """hard / soft (Mean@1) and hard_mean3 / soft_mean3 of one evaluation under one protocol."""
    m = report["metrics"]
    return {
        **extra,
        "hard": m["hard@1"][protocol],
        "soft": m["soft@1"][protocol],
        "hard_mean3": m["hard@3"][protocol],
        "soft_mean3": m["soft@3"][protocol],
        "format_rate": report["format_rate"],
        "soft_spread": report["soft_spread"],
    }


def hidden_quality(root: Path) -> dict[str, int]:
    """The hidden quality of every synthetic HPDv2 test image, by file name (``synthetic.json``)."""
    manifest, test = (json.loads((root / name).read_text()) for name in ("synthetic.json", "test.json"))
    return {Path(p).name: q for row, qs in zip(test, manifest["test_quality"], strict=True)
            for p, q in zip(row["image_path"], qs, strict=True)}  # fmt: skip


def pair_accuracy(eval_dir: Path, quality: dict[str, int]) -> float:
    """How often the judge's p(j ≻ anchor) (Mean@1 soft) is above 0.5 exactly when image j's hidden
    quality is above the anchor's, over the anchor comparisons of unequal quality."""
    right = total = 0
    for line in (eval_dir / "predictions.jsonl").read_text().splitlines():
        row = json.loads(line)
        q = [quality[Path(p).name] for p in row["images"]]
        a = row["anchor"]
        for j, p_j in enumerate(row["scores"]["soft@1"]):
            if j != a and q[j] != q[a]:
                right += (p_j > 0.5) == (q[j] > q[a])
                total += 1
    return right / total


def ceiling(root: Path, quality: dict[str, int]) -> float:
    """The HPSv2 protocol's accuracy when every test image is scored by its hidden quality."""
    test = json.loads((root / "test.json").read_text())
    scores = [[quality[Path(p).name] for p in row["image_path"]] for row in test]
    return hpsv2_accuracy([row["rank"] for row in test], scores)


def rating_targets(half: dict) -> dict[str, bool]:
    z, t = half["zero_shot"], half["trained"]
    return {
        f"rating: trained soft >= {RATING_TARGETS['trained_soft_min']}": t["soft"] >= RATING_TARGETS["trained_soft_min"],
        f"rating: soft gain >= {RATING_TARGETS['soft_gain_min']}": t["soft"] - z["soft"] >= RATING_TARGETS["soft_gain_min"],
        f"rating: hard gain >= {RATING_TARGETS['hard_gain_min']}": t["hard"] - z["hard"] >= RATING_TARGETS["hard_gain_min"],
        "rating: trained soft >= trained hard": t["soft"] >= t["hard"],
    }  # fmt: skip


def pair_targets(half: dict) -> dict[str, bool]:
    z, t = half["zero_shot"], half["trained"]
    return {
        f"pairs: trained pair accuracy >= {PAIR_TARGETS['pair_accuracy_min']}": t["pair_accuracy"] >= PAIR_TARGETS["pair_accuracy_min"],
        f"pairs: trained soft >= {PAIR_TARGETS['trained_soft_min']}": t["soft"] >= PAIR_TARGETS["trained_soft_min"],
        f"pairs: soft gain >= {PAIR_TARGETS['soft_gain_min']}": t["soft"] - z["soft"] >= PAIR_TARGETS["soft_gain_min"],
        "pairs: trained soft >= trained hard": t["soft"] >= t["hard"],
    }  # fmt: skip


def check_targets(report: dict) -> dict[str, bool]:
    """Every target of the halves the report holds, and the wall time of the whole demo."""
    met = {}
    if "imagereward" in report:
        met |= rating_targets(report["imagereward"])
    if "hpsv2" in report:
        met |= pair_targets(report["hpsv2"])
    if {"imagereward", "hpsv2"} <= set(report):
        met[f"wall seconds <= {WALL_SECONDS_MAX}"] = report["wall_seconds"] <= WALL_SECONDS_MAX
    return met


def summary(report: dict, out: Path) -> str:
    """The demo's ``summary.md``: Tables 1–2 of the evaluations it ran, the pairwise extras, the
    targets and the time."""
    evals = [(f"{name} ({stage})", out / "eval" / f"{kind}-{stage}" / "report.json")
             for name, kind in (("ratings", "imagereward"), ("pairs", "hpdv2"))
             for stage in ("zero-shot", "trained")]  # fmt: skip
    rows = [(label, json.loads(path.read_text())) for label, path in evals if path.exists()]
    pages = [f"[{label}]({path.parent.relative_to(out) / 'report.html'})" for label, path in evals
             if (path.parent / "report.html").exists()]  # fmt: skip
    parts = [f"# Demo: GRPO on the tiny Qwen2.5-VL, synthetic data (seed {report['seed']})", "",
             table1(rows, None), "", table2(rows, None), ""]  # fmt: skip
    if pages:  # each evaluation's page: images ranked, scores, reasoning, diagnostics
        parts += ["Evaluation pages: " + ", ".join(pages) + ".", ""]
    if "hpsv2" in report:
        hp = report["hpsv2"]
        parts += [
            f"Pairs: pair accuracy (p(j ≻ anchor) > 0.5 exactly when j's hidden quality is higher) "
            f"{100 * hp['zero_shot']['pair_accuracy']:.1f} → {100 * hp['trained']['pair_accuracy']:.1f}%; "
            f"the HPSv2 protocol's ceiling on this test set (images scored by their hidden quality) "
            f"{100 * hp['ceiling']:.1f}%.",
            "",
        ]
    met = "\n".join(f"- [{'x' if ok else ' '}] {name}" for name, ok in report["targets_met"].items())
    parts += ["Targets:", met, "", f"Wall time {report['wall_seconds']:.0f} s."]
    if "stretch" in report:
        z, t = report["stretch"]["zero_shot"], report["stretch"]["trained"]
        parts += ["", f"Stretch (prompt-conditioned tier, small preset; no targets): soft {100 * z['soft']:.1f} → "
                      f"{100 * t['soft']:.1f}, hard {100 * z['hard']:.1f} → {100 * t['hard']:.1f}."]  # fmt: skip
    return "\n".join(parts) + "\n"


def plot_curves(runs: dict[str, tuple[Path, str, int]], path: Path) -> None:
    """Reward per step (and its moving average) and held-out soft accuracy, one panel per run.

    ``runs`` maps a title to (run folder, the ``metrics.jsonl`` key of its held-out accuracy, the
    step of the kept model, marked by a dotted line).
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    fig, axes = plt.subplots(1, len(runs), figsize=(6 * len(runs), 4), squeeze=False)
    for ax, (title, (run, acc_key, kept)) in zip(axes[0], runs.items()):
        rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
        steps = [r["step"] for r in rows]
        reward = np.array([r["reward_mean"] for r in rows])
        w = min(20, len(rows))
        smooth = np.convolve(reward, np.ones(w) / w, mode="valid")  # (steps − w + 1,)
        ax.plot(steps, reward, color="0.8", lw=0.8, label="reward (per step)")
        ax.plot(steps[w - 1 :], smooth, color="C0", label=f"reward ({w}-step mean)")
        ax.set(xlabel="GRPO step", ylabel="mean reward", title=title)
        ax.axvline(kept, color="0.4", ls=":", label=f"kept model (step {kept})")
        ax.legend(loc="upper left")
        evals = [(r["step"], r[acc_key]) for r in rows if r.get(acc_key) is not None]
        if evals:
            ax2 = ax.twinx()
            ax2.plot(*zip(*evals), "o-", color="C3", label="held-out soft accuracy")
            ax2.set(ylabel="held-out soft accuracy", ylim=(0, 1))
            ax2.legend(loc="lower right")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
