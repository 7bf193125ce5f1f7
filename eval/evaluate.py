"""Evaluate a preference judge on ImageReward's or HPDv2's test prompts: ``python -m eval.evaluate CONFIG.yaml``.

    python -m eval.evaluate experiments/imagereward.yaml model.name_or_path=runs/ir/checkpoint-001000 eval.k=3
    python -m eval.evaluate experiments/hpsv2.yaml data.root=/data/HPDv2 --method round-robin --debias

Every image of every test prompt gets a **soft** and a **hard** score (``eval.score``) from
``eval.k`` reasoning rollouts, by one of three methods: ``rating`` (default for ImageReward:
E[r|C] over the rating scale), ``anchor`` (default for HPDv2: p(j ≻ anchor), the anchor 0.5) or
``round-robin`` (all pairs, Bradley–Terry). Both official protocols are reported for every
score (docs/data-and-metrics.md): ``imagereward_accuracy`` (pooled pairs, model ties wrong),
``hpsv2_accuracy`` (per-prompt inversions, ties by index), plus ``pairwise_accuracy`` (model ties
half right).

**Mean@k**: a run with k > 1 rollouts reports both Mean@1 (the first rollout of every request)
and Mean@k, under the keys ``soft@1``, ``hard@1``, ``soft@k``, ``hard@k``. The paper's Table 1
(Mean@1 / Mean@3) therefore needs one run with ``eval.k=3``.

Choices made here:
- ``rating`` on HPDv2 is allowed (a zero-shot judge can rate on any scale) but needs a scale:
  ``--scale 1-7``. Otherwise the scale is the one the checkpoint was trained on (its
  ``task.json``), else the configured ``data.rating_min``–``data.rating_max`` (ImageRewardDB:
  1–7). It is never read from the data, so one bad row cannot change it.
- An image that fails to decode is dropped from its prompt and counted (``skipped``); a prompt
  left with fewer than two images is dropped and counted. Nothing crashes on bad data.
- ``soft_spread`` is the std of all images' soft scores (Mean@k): near 0 means the judge gives
  every image the same score, the collapse GRPO drifts into on a task it cannot perceive.
- Sampling is seeded from ``eval.seed`` inside ``torch.random.fork_rng``: the same seed gives
  the same scores, and the caller's RNG stream (e.g. the train loop's) is left untouched.

Writes ``report.json``, ``predictions.jsonl`` (per prompt: the images, human ranks, anchor,
every image score, and each request's image indices, rollout texts and per-rollout scores),
``summary.md`` (a markdown table) and ``report.html`` (the page to read: tables, diagnostics, and
every prompt's images as thumbnails, ranked, with scores and reasoning) into ``--out`` (default
``runs/eval/<model folder>-<kind>-<split>-<method>-k<k>``). The report's keys:

- ``metrics[score][protocol]`` for score in soft@1, hard@1 (+ soft@k, hard@k) and protocol in
  imagereward_accuracy, hpsv2_accuracy, pairwise_accuracy (None if every pair is a human tie);
- ``label``, ``model``, ``kind``, ``method``, ``debias``, ``k``, ``seed``, ``temperature``,
  ``max_new_tokens``, ``batch_size``, ``rating_values``, ``primary_metric`` (the set's protocol);
- counts ``n_groups``, ``n_groups_input``, ``n_images``, ``n_requests``, ``n_rollouts``,
  ``pairs``, ``human_ties``, ``skipped`` (reason → count), ``n_skipped``, ``skipped_reading``;
- ``format_rate`` (well-formed rollouts), ``fallback_rate`` (soft scores read after an appended
  answer prefix), ``soft_spread``, ``soft_spread_group`` (mean per-prompt std), ``wall_s``,
  ``images_per_s``;
- ``diagnostics`` (``eval.diagnostics``): ``ece`` and its reliability ``calibration`` bins,
  ``parse_failure_rate``, ``hard_soft_disagreement`` and, for pairwise methods,
  ``position_consistency`` (from the debiased requests, or from asking the first
  ``eval.swap_groups`` groups' comparisons again with the images swapped).
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
import time
from collections import Counter
from pathlib import Path

import numpy as np
from tqdm import tqdm

from common.config import EvalConfig, load_config
from common.errors import DataError, user_errors_exit
from data.images import BadImageError
from data.read import EVAL_HELP, read_eval_set
from data.types import EvalGroup
from eval.diagnostics import judge_diagnostics
from eval.metrics import count_pairs, hpsv2_accuracy, imagereward_accuracy, pairwise_accuracy
from eval.report_html import evaluation_page
from eval.scale import parse_scale, rating_scale

# torch, transformers and the scoring code (eval.score) are imported where they are used, so that
# --help and the data checks answer in a second instead of after the ~5 s it takes to import them.

logger = logging.getLogger(__name__)

METHODS = ("rating", "anchor", "round-robin")  # = eval.score.METHODS (a test checks it)
DEFAULT_METHOD = {"imagereward": "rating", "hpdv2": "anchor"}
PRIMARY_METRIC = {"imagereward": "imagereward_accuracy", "hpdv2": "hpsv2_accuracy"}
MAX_LOGGED_BAD_IMAGES = 10


def resolve_method(method: str, kind: str) -> str:
    """``auto`` → rating for ImageReward, anchor for HPDv2; otherwise one of ``METHODS``."""
    method = DEFAULT_METHOD[kind] if method == "auto" else method
    if method not in METHODS:
        raise ValueError(f"unknown evaluation method {method!r}; expected auto or one of {METHODS}")
    return method


def accuracies(rankings: list[list[float]], scores: list[list[float]]) -> dict[str, float | None]:
    """The three accuracies; the pooled ones are None when every pair is a human tie."""
    untied = count_pairs(rankings)
    defined = untied["pairs"] > untied["human_ties"]
    return {
        "imagereward_accuracy": imagereward_accuracy(rankings, scores) if defined else None,
        "hpsv2_accuracy": hpsv2_accuracy(rankings, scores),
        "pairwise_accuracy": pairwise_accuracy(rankings, scores) if defined else None,
    }


def evaluate(
    model,
    processor,
    groups: list[EvalGroup],
    kind: str,
    rating_values: tuple[int, ...] | None,
    cfg: EvalConfig,
    max_new_tokens: int,
    out_dir: str | Path | None = None,
    progress: bool = True,
    *,
    method: str | None = None,
    debias: bool = False,
    label: str = "",
    model_name: str = "",
    read_skipped: Counter | None = None,
    position_check: bool = True,
) -> dict:
    """Score every group and return the report (see the module docstring); write files to ``out_dir``.

    ``rating_values`` is the rating scale (method rating; ignored otherwise). ``method``
    overrides ``cfg.method`` (and may be ``round-robin``); ``debias`` asks every comparison in
    both orders. ``cfg.max_groups`` keeps the first N groups. ``label`` and ``model_name`` name
    the model in the report; ``read_skipped`` (the reader's skip counts) is copied into it as
    ``skipped_reading``. The model's train/eval mode and the global RNG state are restored.
    ``position_check`` off skips the swap check of pairwise methods (``cfg.swap_groups``).
    """
    from eval.score import ScoringSpec, score_groups, seeded, swapped_answers

    t0 = time.perf_counter()
    if kind not in DEFAULT_METHOD:
        raise ValueError(f"unknown dataset kind {kind!r}; expected one of {sorted(DEFAULT_METHOD)}")
    method = resolve_method(method or cfg.method, kind)
    scale = tuple(rating_values or ()) if method == "rating" else ()
    spec = ScoringSpec(method, scale, cfg.k, max_new_tokens, cfg.temperature,
                       cfg.batch_size, cfg.seed, debias)  # fmt: skip
    groups = groups[: cfg.max_groups] if cfg.max_groups else list(groups)
    skipped: Counter = Counter()
    kept: list[tuple[EvalGroup, list[int]]] = []  # (group, indices of its usable images), in result order
    bar = tqdm(total=len(groups), desc=f"eval {kind} {method} k={cfg.k}", disable=not progress, unit="prompt")

    def loaded():
        for g in groups:
            if not g.prompt.strip():
                skipped["empty prompt"] += 1
                bar.update(1)
                continue
            images, keep = [], []
            for i, ref in enumerate(g.images):
                try:
                    images.append(ref.load())
                    keep.append(i)
                except BadImageError as e:
                    skipped["bad image"] += 1
                    if skipped["bad image"] <= MAX_LOGGED_BAD_IMAGES:
                        logger.warning("group %s: %s", g.group_id, e)
            if len(images) < 2:
                skipped["fewer than 2 usable images"] += 1
                bar.update(1)
                continue
            kept.append((g, keep))
            yield g.group_id, g.prompt, images

    results, swapped = [], None
    was_training = model.training
    model.eval()
    try:
        with seeded(cfg.seed):
            for result in score_groups(model, processor, loaded(), spec):
                results.append(result)
                bar.update(1)
        if spec.task == "pair" and not debias and position_check and cfg.swap_groups > 0:
            n = cfg.swap_groups
            check = [(r, [g.images[i].load() for i in keep]) for r, (g, keep) in zip(results[:n], kept[:n])]
            with seeded(cfg.seed + 1):  # after the scores: they are the same with or without it
                swapped = swapped_answers(model, processor, check, spec)
    finally:
        model.train(was_training)
        bar.close()
    if not results:
        raise DataError(f"no group could be evaluated: skipped {dict(skipped)}")
    report = build_report(results, kept, spec, kind, time.perf_counter() - t0, skipped, len(groups))
    report["diagnostics"] = judge_diagnostics(results, kept, spec.task, spec.values, swapped)
    report.update(label=label or model_name, model=model_name, skipped_reading=dict(read_skipped or {}))
    if out_dir is not None:
        write_outputs(Path(out_dir), report, results, kept)
    return report


def build_report(results, kept, spec, kind: str, wall_s: float, skipped: Counter, n_input: int) -> dict:
    """The figures of one evaluation (every value JSON-serialisable; numbers are what the train loop logs)."""
    rankings = [[float(g.ranks[i]) for i in keep] for g, keep in kept]
    metrics = {key: accuracies(rankings, [r.scores[key] for r in results]) for key in results[0].scores}
    judgements = [j for r in results for j in r.judgements]
    rollouts = [(ok, fb) for j in judgements for ok, fb in zip(j.well_formed, j.fallback)]
    soft_key = f"soft@{spec.k}"
    soft = [np.asarray(r.scores[soft_key]) for r in results]
    n_images = sum(r.n_images for r in results)
    return {
        "label": "",
        "model": "",
        "kind": kind,
        "method": spec.method,
        "debias": spec.debias,
        "k": spec.k,
        "seed": spec.seed,
        "temperature": spec.temperature,
        "max_new_tokens": spec.max_new_tokens,
        "batch_size": spec.batch_size,
        "rating_values": list(spec.rating_values) or None,
        "primary_metric": PRIMARY_METRIC[kind],
        "metrics": metrics,
        "n_groups": len(results),
        "n_groups_input": n_input,
        "n_images": n_images,
        "n_requests": len(judgements),
        "n_rollouts": len(rollouts),
        **count_pairs(rankings),
        "skipped": dict(skipped),
        "n_skipped": sum(skipped.values()),
        "format_rate": float(np.mean([ok for ok, _ in rollouts])) if rollouts else 0.0,
        "fallback_rate": float(np.mean([fb for _, fb in rollouts])) if rollouts else 0.0,
        "soft_spread": float(np.std(np.concatenate(soft))),
        "soft_spread_group": float(np.mean([s.std() for s in soft])),
        "wall_s": wall_s,
        "images_per_s": n_images / max(wall_s, 1e-9),
    }


def write_outputs(out: Path, report: dict, results: list, kept) -> None:
    """``report.json``, ``predictions.jsonl`` (one line per prompt), ``summary.md`` and ``report.html``
    (``eval.report_html``: the page a person reads, with thumbnails and the reasoning)."""
    out.mkdir(parents=True, exist_ok=True)
    (out / "report.json").write_text(json.dumps(report, indent=2) + "\n")
    with open(out / "predictions.jsonl", "w") as fh:
        for r, (g, keep) in zip(results, kept):
            row = {
                "group_id": r.group_id,
                "prompt": r.prompt,
                "images": [str(g.images[i]) for i in keep],
                "human_ranks": [g.ranks[i] for i in keep],
                "anchor": r.anchor,
                "scores": r.scores,
                "requests": [
                    {
                        "images": list(idx),
                        "texts": j.texts,
                        "soft": j.soft,
                        "hard": j.hard,
                        "well_formed": j.well_formed,
                        "fallback": j.fallback,
                        "choice": j.choice,
                    }
                    for idx, j in zip(r.requests, r.judgements)
                ],
            }
            fh.write(json.dumps(row) + "\n")
    (out / "summary.md").write_text(summary_markdown(report))
    (out / "report.html").write_text(evaluation_page(report, results, kept))


def summary_markdown(report: dict) -> str:
    """A markdown table: one row per score (soft/hard × Mean@k), one column per protocol."""

    def pct(x):
        return "—" if x is None else f"{100 * x:.1f}"

    debias = " (position-debiased)" if report["debias"] else ""
    lines = [
        f"# Evaluation: {report['label'] or report['model'] or 'model'} on {report['kind']}",
        "",
        f"method `{report['method']}`{debias}, k = {report['k']}, seed {report['seed']}, "
        f"{report['n_groups']} prompts / {report['n_images']} images / {report['pairs']} pairs "
        f"({report['human_ties']} human ties), skipped {report['skipped'] or 'nothing'}.",
        f"Format rate {report['format_rate']:.3f}, soft-score fallback rate {report['fallback_rate']:.3f}, "
        f"soft spread {report['soft_spread']:.4g}; {report['wall_s']:.1f} s, {report['images_per_s']:.2f} images/s.",
        "",
        "| score | ImageReward acc. | HPSv2 acc. | pairwise acc. |",
        "|---|---|---|---|",
    ]
    for key, m in report["metrics"].items():
        lines.append(f"| {key} | {pct(m['imagereward_accuracy'])} | {pct(m['hpsv2_accuracy'])} "
                     f"| {pct(m['pairwise_accuracy'])} |")  # fmt: skip
    lines += [
        "",
        f"Accuracies in %. The official protocol for {report['kind']} is `{report['primary_metric']}`.",
    ]
    if "diagnostics" in report:
        lines += ["", diagnostics_line(report["diagnostics"])]
    return "\n".join(lines) + "\n"


def diagnostics_line(d: dict) -> str:
    """The judge diagnostics in one line (docs/monitoring.md)."""

    def num(x):
        return "—" if x is None else f"{x:.3f}"

    parts = [f"ECE {num(d['ece'])} ({d['calibration']['basis']}, n = {d['calibration']['n']})",
             f"parse failures {num(d['parse_failure_rate'])}",
             f"hard ≠ soft choice {num(d['hard_soft_disagreement'])}"]  # fmt: skip
    if "position_consistency" in d:
        pc = d["position_consistency"]
        parts.append("position consistency not measured" if pc is None else
                     f"position inconsistency {pc['inconsistency']:.3f}, flips {pc['flip_rate']:.3f}, "
                     f"second-slot bias {pc['second_slot_bias']:+.3f} over {pc['n_pairs']} pairs")  # fmt: skip
    return "Diagnostics: " + "; ".join(parts) + "."


# ----------------------------------------------------------------------------------- the CLI


def scale_for(cfg, method: str, given: str | None) -> tuple[tuple[int, ...] | None, str]:
    """The rating scale (``eval.scale.rating_scale``) and where it came from; ``None`` for the
    pairwise methods unless ``--scale`` is given."""
    if not given and method != "rating":
        return None, ""
    configured = cfg.data.rating_values if cfg.data.kind == "imagereward" else None
    scale, source = rating_scale(cfg.model.name_or_path, parse_scale(given) if given else None, configured,
                                 "data.rating_min/rating_max")  # fmt: skip
    if scale is None:
        raise ValueError("method rating on HPDv2 needs a rating scale: pass --scale 1-7")
    if configured and not given and scale != configured:
        print(f"note: {source} gives scale {scale}, not the configured {configured}; using the checkpoint's",
              file=sys.stderr)  # fmt: skip
    return scale, source


def read_groups(cfg, scale: tuple[int, ...] | None = None) -> tuple[list[EvalGroup], Counter]:
    """The evaluation groups of ``data.kind`` under ``eval.root`` (or ``data.root``) and the reader's skips.

    With a rating ``scale`` (ImageRewardDB), rows rated outside it are skipped as in training."""
    eval_set = read_eval_set(cfg.data.kind, cfg.eval_root, cfg.eval.split, cfg.data.rating_field, scale)
    return eval_set.groups, eval_set.skipped


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        prog="python -m eval.evaluate",
        description=__doc__.split("\n\n")[0],
        epilog=__doc__.split("\n\n", 1)[1],
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("config", help="experiment YAML, e.g. experiments/imagereward.yaml")
    parser.add_argument(
        "overrides", nargs="*", help="section.key=value, e.g. eval.k=3 model.name_or_path=DIR"
    )
    parser.add_argument(
        "--out", help="output folder (default runs/eval/<model>-<kind>-<split>-<method>-k<k>)"
    )
    parser.add_argument(
        "--method", choices=("auto", *METHODS), help="overrides eval.method; also round-robin"
    )
    parser.add_argument("--debias", action="store_true", help="pairwise: ask each comparison in both orders")
    parser.add_argument(
        "--scale",
        help="rating scale LO-HI or a comma list (default: the checkpoint's task.json, else "
        "data.rating_min-rating_max; never read from the data)",
    )
    parser.add_argument("--label", default="", help="name of this model in report.json and the tables")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")
    args = parser.parse_intermixed_args(argv)
    with user_errors_exit():
        run(args, parser)


def run(args, parser) -> None:
    """The command's body: data, scale and model are checked before anything slow is loaded."""
    cfg = load_config(args.config, args.overrides)
    root = cfg.eval_root
    if not Path(root).is_dir():
        parser.exit(2, f"error: evaluation data folder {root!r} not found: {EVAL_HELP[cfg.data.kind]}, "
                       f"or point eval.root=... (or data.root=...) at it\n")  # fmt: skip
    try:
        method = resolve_method(args.method or cfg.eval.method, cfg.data.kind)
        scale, scale_source = scale_for(cfg, method, args.scale)
        groups, read_skipped = read_groups(cfg, scale)
    except (ValueError, OSError) as e:
        parser.exit(2, f"error: {e}\n")
    if scale_source:
        print(f"rating scale {scale} from {scale_source}", file=sys.stderr)

    from data.sets import drop_long_prompts
    from eval.rank import load_model
    from models.qwen_vl import resolve_device

    name = cfg.model.name_or_path
    out = Path(
        args.out or f"runs/eval/{Path(name).name}-{cfg.data.kind}-{cfg.eval.split}-{method}-k{cfg.eval.k}"
    )
    device = resolve_device(cfg.train.device)
    model, processor = load_model(name, cfg.model.dtype, device, cfg.model.min_pixels, cfg.model.max_pixels)
    groups = drop_long_prompts(
        groups, processor.tokenizer, cfg.data.max_prompt_tokens, read_skipped, "prompt"
    )
    if not groups:
        raise DataError(
            f"no evaluation prompt is within data.max_prompt_tokens: skipped {dict(read_skipped)}"
        )
    evaluate(model, processor, groups, cfg.data.kind, scale, cfg.eval,
             cfg.eval_max_new_tokens, out, progress=not args.no_progress,
             method=method, debias=args.debias, label=args.label or Path(name).name, model_name=name,
             read_skipped=read_skipped)  # fmt: skip
    print((out / "summary.md").read_text())
    print(
        f"wrote {out / 'report.json'}, {out / 'predictions.jsonl'}, {out / 'summary.md'}, {out / 'report.html'}"
    )


if __name__ == "__main__":
    main()
