"""The stages of ``make demo``, one function per half: ``rating_half``, ``pairs_half`` and ``stretch_half``.

Each half builds its tiny model, cold-starts it (``grpo.coldstart``), evaluates it zero-shot on
the test split, trains it with GRPO (the best held-out model kept), evaluates it again, and
returns its part of ``report.json``. The halves share nothing but the data seed, so
``experiments/demo.py`` runs them side by side. ``docs/demo.md`` explains the design and the
measurements behind every constant here.
"""

from __future__ import annotations

import json
import sys
import time
from itertools import combinations
from pathlib import Path

import torch
from PIL import Image
from safetensors.torch import load_file, save_file

from common.config import DataConfig, EvalConfig, load_config
from data.hpdv2 import read_eval as read_hpdv2_eval
from data.hpdv2 import read_train as read_hpdv2_train
from data.imagereward import read_eval as read_ir_eval
from data.imagereward import read_train as read_ir_train
from data.synthetic import COLOURS, colour_mapping, write_hpdv2, write_imagereward
from eval.evaluate import evaluate
from experiments.demo_report import ACC_KEY, ceiling, figures, hidden_quality, pair_accuracy
from grpo.coldstart import PAIR_TASTE_SCALE, Taste, cold_start
from grpo.train import train
from models.qwen_vl import load_policy
from models.tiny import build_tiny

EXPERIMENTS = Path(__file__).resolve().parent
HELD_OUT_DRAW = 1000  # draw_seed of the pairwise run's held-out folder: seed + 1000, the same preference
PAIR_PRESET = "tiny-pairs"  # the pairwise run's model (models.tiny.PRESETS)
# The cold start of each half (grpo.coldstart.cold_start): learn the taste until the mean answer
# loss of the last 20 steps is at most `until_nll` (at most `steps` steps), then `calibrate_steps`
# steps whose answers are replaced with probability `noise`. docs/demo.md has the measurements.
COLD = {
    "rating": {"steps": 400, "until_nll": 0.5, "warmup": 15, "calibrate_steps": 0, "noise": 0.0},
    "pairs": {"steps": 600, "until_nll": 0.1, "warmup": 30, "calibrate_steps": 60, "noise": 0.2},
}
# The rating half's GRPO: tiny.yaml with DAPO's dynamic sampling, as the pairs half's
# tiny_hpsv2.yaml: groups whose rewards all agree are replaced by fresh prompts, so the policy
# keeps learning the digits it has grown certain about too early (docs/demo.md).
RATING_GRPO = ("grpo.dynamic_sampling=true",)
# The stretch run's GRPO: tiny.yaml at a third of its learning rate on a cosine schedule (at 3e-4
# constant the small preset collapsed to one rating by step 300).
STRETCH_GRPO = ("train.lr=1e-4", "train.lr_schedule=cosine")


class Stages:
    """Prints each stage as it starts and keeps its wall time."""

    def __init__(self, name: str):
        self.name, self.t0, self.seconds, self._stage, self._start = name, time.perf_counter(), {}, None, 0.0

    def start(self, stage: str, what: str) -> None:
        self.stop()
        self._stage, self._start = stage, time.perf_counter()
        print(f"\n== [{self.name} {time.perf_counter() - self.t0:5.0f} s] {what}", flush=True)

    def stop(self) -> None:
        if self._stage:
            self.seconds[self._stage] = round(time.perf_counter() - self._start, 1)
            self._stage = None

    @property
    def total(self) -> float:
        return time.perf_counter() - self.t0


# ------------------------------------------------------------------------------- the taste


def taste_of_colours(taste_seed: int, scale: tuple[int, ...]) -> dict[str, int]:
    """The rating the cold start's taste gives each synthetic colour."""
    taste = Taste.draw(scale, taste_seed)
    return {name: taste.rate(Image.new("RGB", (4, 4), rgb)) for name, rgb in COLOURS.items()}


def colour_pairs_agreeing(taste: dict[str, int], mapping: dict[str, int]) -> int:
    """Of the 6 pairs of colours, how many the taste orders as the hidden mapping does."""
    return sum((taste[a] - taste[b]) * (mapping[a] - mapping[b]) > 0 for a, b in combinations(COLOURS, 2))


def neutral_taste_seed(data_seed: int, scale: tuple[int, ...] = PAIR_TASTE_SCALE) -> int:
    """The first taste seed whose ratings order exactly 3 of the 6 colour pairs as the hidden
    mapping of ``data_seed`` does (Kendall's τ = 0): an opinion about the images that carries no
    information about the preference, so every data seed starts at chance, as the paper's
    zero-shot Qwen2.5-VL does (51%), and the targets measure what GRPO taught."""
    mapping = colour_mapping(data_seed)
    return next(t for t in range(10_000) if colour_pairs_agreeing(taste_of_colours(t, scale), mapping) == 3)


# ------------------------------------------------------------------------------ the stages


def build_model(out: Path, preset: str, perturb_ulps: float, perturb_seed: int) -> Path:
    """The tiny model of ``preset``; with ``perturb_ulps`` > 0 every initial weight w moves by
    about that many units in the last place (w · (1 + u · ulps · 2⁻²³), u ~ N(0, 1)): a stand-in
    for another machine's rounding of the same initialisation."""
    model = build_tiny(out, seed=0, preset=preset)
    if perturb_ulps:
        path = model / "model.safetensors"
        weights = load_file(path)
        g = torch.Generator().manual_seed(perturb_seed)
        for name, w in weights.items():
            if w.is_floating_point():
                noise = torch.randn(w.shape, generator=g, dtype=torch.float64)
                weights[name] = (w.double() * (1 + noise * perturb_ulps * 2.0**-23)).to(w.dtype)
        save_file(weights, path, metadata={"format": "pt"})
    return model


def cold_summary(model_dir: Path) -> dict:
    """What the cold start ended with (its ``cold_start.json``): steps of each phase, whether the
    answers came to follow the images, the answer loss over the last 10 steps against the loss of
    answers that ignore the images. Warns when the learning phase ran out of steps first."""
    record = json.loads((model_dir / "cold_start.json").read_text())
    last = sum(record["answer_nll"][-10:]) / len(record["answer_nll"][-10:])
    print(f"cold start: {record['learn_steps']} + {record['calibrate_steps']} steps, answer loss {last:.3f} "
          f"over the last 10 ({record['answer_entropy']:.3f} for answers that ignore the images)")  # fmt: skip
    if record["until_nll"] is not None and record["reached_until_nll"] is None:
        print(f"WARNING: the cold start's answers did not come to follow the images within {record['max_steps']} "
              "steps; GRPO will likely find only the answer that is best on average.", file=sys.stderr)  # fmt: skip
    keys = ("learn_steps", "calibrate_steps", "reached_until_nll", "noise", "noise_floor", "answer_entropy")
    return {"answer_nll_last10": round(last, 4), **{k: record[k] for k in keys}}


def run_eval(model_dir: Path, kind: str, data_root: Path, out: Path, label: str, args) -> dict:
    """Evaluate one model folder on the test split with k = 3 rollouts (so Mean@1 and Mean@3)."""
    model, processor = load_policy(str(model_dir), dtype="float32", device="cpu")
    if kind == "imagereward":
        rating_values = read_ir_train(data_root).rating_values
        # with the human ratings, so the diagnostics calibrate the soft rating against them
        groups = read_ir_eval(data_root, "test", DataConfig.rating_field, rating_values).groups
    else:
        groups, rating_values = read_hpdv2_eval(data_root).groups, None
    cfg = EvalConfig(k=3, max_new_tokens=args.max_new_tokens, seed=args.seed, batch_size=32)
    report = evaluate(model, processor, groups, kind, rating_values, cfg, args.max_new_tokens, out_dir=out,
                      label=label, model_name=str(model_dir))  # fmt: skip
    print((out / "summary.md").read_text())
    return report


def grpo_run(config: str, model_dir: Path, data_root: Path, out: Path, steps: int, args,
             held_out: Path | None = None, extra: tuple[str, ...] = ()) -> tuple[Path, int]:  # fmt: skip
    """GRPO with an experiment file; held-out evaluation every ``--eval-every`` steps logs the
    accuracy and the spread of soft scores (ImageReward: the validation split; HPDv2, which has
    none: ``held_out``, a second synthetic folder of the same preference), so test stays unseen.

    A checkpoint is kept at every evaluation, and the one with the best held-out soft accuracy is
    returned with its step: late in a run GRPO can drift into a collapse, and the stopping rule
    keeps the model from before it. ``extra``: further ``key=value`` overrides.
    """
    overrides = [f"model.name_or_path={model_dir}", f"data.root={data_root}", f"train.output_dir={out}",
                 f"train.steps={steps}", f"train.seed={args.seed}", f"eval.every={args.eval_every}",
                 f"train.save_every={args.eval_every}", f"train.keep_last={steps // args.eval_every + 1}", *extra]  # fmt: skip
    cfg = load_config(str(EXPERIMENTS / config), overrides)
    if cfg.data.kind == "imagereward":
        cfg.eval.root, cfg.eval.split = str(data_root), "validation"
    else:
        cfg.eval.root = str(held_out)
    train(cfg)
    return best_checkpoint(out, ACC_KEY[cfg.data.kind])


def best_checkpoint(run: Path, acc_key: str) -> tuple[Path, int]:
    """The checkpoint of the evaluation with the best held-out accuracy (ties: the later step)."""
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    evals = [(r[acc_key], r["step"], r["eval/soft_spread"]) for r in rows if r.get(acc_key) is not None]
    for acc, step, spread in evals:
        print(f"  step {step:4d}: held-out soft accuracy {acc:.3f}, soft spread {spread:.3f}")
    acc, step, _ = max(evals)
    print(f"keeping the model of step {step} (held-out soft accuracy {acc:.3f})")
    return run / f"checkpoint-{step:06d}", step


def cold_settings(args, half: str, taste_seed: int) -> dict:
    return {**COLD[half], "seed": args.cold_seed, "taste_seed": taste_seed, "answers": "taste"}


# ------------------------------------------------------------------------------- the halves


def rating_half(args, out: Path) -> dict:
    """Ratings of single images (ImageRewardDB format, the ImageReward protocol); the report's
    ``imagereward`` part."""
    st = Stages("rating")
    st.start("setup", "rating half: tiny Qwen2.5-VL, synthetic ImageRewardDB folder")
    model = build_model(out / "tiny-model", "tiny", args.perturb_ulps, args.perturb_seed)
    root = out / "data" / "imagereward"
    write_imagereward(root, prompts=args.prompts, seed=args.seed)
    train_set = read_ir_train(root)
    mapping = colour_mapping(args.seed)
    taste_seed = neutral_taste_seed(args.seed) if args.taste_seed is None else args.taste_seed
    taste = taste_of_colours(taste_seed, train_set.rating_values)
    agree = colour_pairs_agreeing(taste, mapping)
    print(f"hidden ground truth (seed {args.seed}): the drawn colour sets the rating, {mapping}")
    print(f"the cold start's taste (seed {taste_seed}): {taste}; it orders {agree} of the 6 colour pairs as the "
          "hidden mapping does")  # fmt: skip

    st.start("cold_start", "rating half: cold start (the answer format, the taste's ratings)")
    cold_dir = cold_start(
        str(model), train_set, str(out / "cold-imagereward"), **cold_settings(args, "rating", taste_seed)
    )
    cold = cold_summary(cold_dir)
    st.start("eval_zero_shot", "rating half: zero-shot evaluation (ImageReward test split, k = 3)")
    zero = run_eval(cold_dir, "imagereward", root, out / "eval" / "imagereward-zero-shot", "zero-shot", args)
    st.start("grpo", f"rating half: GRPO on the ImageReward-format training split ({args.steps} steps)")
    final, kept = grpo_run(
        "tiny.yaml", cold_dir, root, out / "grpo-imagereward", args.steps, args, extra=RATING_GRPO
    )
    st.start("eval_trained", "rating half: trained model evaluation (ImageReward test split, k = 3)")
    trained = run_eval(final, "imagereward", root, out / "eval" / "imagereward-trained", "GRPO", args)
    st.stop()
    return {
        "protocol": "imagereward_accuracy",
        "zero_shot": figures(zero, "imagereward_accuracy"),
        "trained": figures(trained, "imagereward_accuracy"),
        "hpsv2_protocol": {"zero_shot": figures(zero, "hpsv2_accuracy"), "trained": figures(trained, "hpsv2_accuracy")},
        "colour_mapping": mapping,
        "cold_start": {"taste_seed": taste_seed, "taste": taste, "colour_pairs_ordered_as_the_mapping": agree, **cold},
        "test": {"prompts": trained["n_groups"], "images": trained["n_images"],
                 "pairs_without_ties": trained["pairs"] - trained["human_ties"]},
        "grpo_steps": args.steps,
        "kept_step": kept,
        "stage_seconds": st.seconds,
        "wall_seconds": round(st.total, 1),
    }  # fmt: skip


def pairs_half(args, out: Path) -> dict:
    """Pairs (HPDv2 format) and anchor-based ranking under the HPSv2 protocol; the report's
    ``hpsv2`` part. The model is the ``tiny-pairs`` preset: with tiny's 2-block vision tower the
    answer on a pair does not come to follow the images, even supervised with the true labels."""
    st = Stages("pairs")
    st.start("setup", "pairs half: tiny-pairs Qwen2.5-VL, synthetic HPDv2 folders")
    model = build_model(out / "tiny-pairs-model", PAIR_PRESET, args.perturb_ulps, args.perturb_seed)
    root, held_out = out / "data" / "hpdv2", out / "data" / "hpdv2-held-out"
    write_hpdv2(root, prompts=args.prompts, seed=args.seed)
    write_hpdv2(held_out, prompts=64, seed=args.seed, draw_seed=HELD_OUT_DRAW + args.seed)
    taste_seed = neutral_taste_seed(args.seed) if args.taste_seed is None else args.taste_seed
    taste = taste_of_colours(taste_seed, PAIR_TASTE_SCALE)

    st.start("cold_start", "pairs half: cold start on pairs (the answer names the image the taste prefers)")
    cold_dir = cold_start(str(model), read_hpdv2_train(root, 1.0), str(out / "cold-hpdv2"),
                          **cold_settings(args, "pairs", taste_seed))  # fmt: skip
    cold = cold_summary(cold_dir)
    quality = hidden_quality(root)
    st.start("eval_zero_shot", "pairs half: zero-shot anchor-based ranking (HPDv2 test, k = 3)")
    zero_dir = out / "eval" / "hpdv2-zero-shot"
    zero = run_eval(cold_dir, "hpdv2", root, zero_dir, "zero-shot", args)
    st.start("grpo", f"pairs half: GRPO on HPDv2-format pairs ({args.pair_steps} steps)")
    final, kept = grpo_run("tiny_hpsv2.yaml", cold_dir, root, out / "grpo-hpdv2", args.pair_steps, args,
                           held_out=held_out)  # fmt: skip
    st.start("eval_trained", "pairs half: trained anchor-based ranking (HPDv2 test, k = 3)")
    trained_dir = out / "eval" / "hpdv2-trained"
    trained = run_eval(final, "hpdv2", root, trained_dir, "GRPO", args)
    st.stop()
    return {
        "protocol": "hpsv2_accuracy",
        "method": "anchor",
        "preset": PAIR_PRESET,
        "zero_shot": figures(zero, "hpsv2_accuracy", pair_accuracy=pair_accuracy(zero_dir, quality)),
        "trained": figures(trained, "hpsv2_accuracy", pair_accuracy=pair_accuracy(trained_dir, quality)),
        "ceiling": ceiling(root, quality),
        "test": {"prompts": trained["n_groups"], "images": trained["n_images"]},
        "cold_start": {"taste_seed": taste_seed, "taste": taste,
                       "colour_pairs_ordered_as_the_mapping": colour_pairs_agreeing(taste, colour_mapping(args.seed)),
                       **cold},
        "grpo_steps": args.pair_steps,
        "kept_step": kept,
        "stage_seconds": st.seconds,
        "wall_seconds": round(st.total, 1),
    }  # fmt: skip


def stretch_half(args, out: Path) -> dict:
    """The stretch run (``--stretch``, ``make demo-full``): the prompt-conditioned tier, where the
    rating depends on whether the drawn colour and shape match the prompt and on defects, with the
    ~6M "small" preset. The same stages as the rating half; no targets."""
    st = Stages("stretch")
    root, work = out / "data" / "imagereward-prompt", out / "stretch"
    st.start("setup", "stretch: small Qwen2.5-VL preset, prompt-conditioned synthetic data")
    small = build_model(work / "small-model", "small", args.perturb_ulps, args.perturb_seed)
    write_imagereward(root, prompts=args.prompts, seed=args.seed, task="prompt")
    taste_seed = neutral_taste_seed(args.seed) if args.taste_seed is None else args.taste_seed
    st.start("cold_start", "stretch: cold start")
    cold_dir = cold_start(
        str(small), read_ir_train(root), str(work / "cold"), **cold_settings(args, "rating", taste_seed)
    )
    st.start("eval_zero_shot", "stretch: zero-shot evaluation (test split, k = 3)")
    zero = run_eval(cold_dir, "imagereward", root, work / "eval-zero-shot", "zero-shot", args)
    st.start("grpo", f"stretch: GRPO ({args.stretch_steps} steps)")
    final, kept = grpo_run(
        "tiny.yaml", cold_dir, root, work / "grpo", args.stretch_steps, args, extra=STRETCH_GRPO
    )
    st.start("eval_trained", "stretch: trained model evaluation (test split, k = 3)")
    trained = run_eval(final, "imagereward", root, work / "eval-trained", "GRPO", args)
    st.stop()
    return {
        "task": "prompt",
        "preset": "small",
        "protocol": "imagereward_accuracy",
        "zero_shot": figures(zero, "imagereward_accuracy"),
        "trained": figures(trained, "imagereward_accuracy"),
        "grpo_steps": args.stretch_steps,
        "kept_step": kept,
        "cold_start": cold_summary(cold_dir),
        "stage_seconds": st.seconds,
        "wall_seconds": round(st.total, 1),
    }


HALVES = {"rating": rating_half, "pairs": pairs_half, "stretch": stretch_half}
