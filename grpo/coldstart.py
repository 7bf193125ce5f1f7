"""Supervised cold start for the tiny model: ``python -m grpo.coldstart MODEL DATA OUT``.

A real Qwen2.5-VL-Instruct brings two things to the paper's zero-shot starting point that a
randomly initialised tiny model lacks: it follows the ``<think>…</think><answer>…</answer>``
instruction, and it has *some* opinion about what it sees. This stage gives the tiny model both
and no knowledge of the preference it will be trained on. The targets are

    <think>I look at the image.</think><answer>{the answer of a taste}</answer><|im_end|>

where the **taste** (``Taste``) rates an image by its dominant hue through a map drawn from its
own seed. For a pair the answer names the image the taste rates higher. The demo picks the taste
seed whose order of the synthetic colours agrees with the hidden preference on exactly half of
the colour pairs, so that every data seed starts at chance (``experiments/demo_pipeline.py``).
This stage is not part of the paper's method and is never used with a real checkpoint.

What the stage must leave behind, for GRPO to have something to teach (``docs/demo.md`` has the
measurements):

- **answers that follow the images.** The answer loss first sits on a plateau where the answers
  ignore the images (ln 2 for pairs, about ln 4 for the four colours' ratings); when the model
  leaves it varies with the batches and with the machine's rounding (150 to over 300 steps on
  the same data). A model stopped on the plateau is blind, and GRPO from it only finds the
  answer that is best on average. So the learning phase stops on the loss (``until_nll``), not
  on a step count;
- **answers that are not certain.** A model that gives its taste's answer with probability
  0.997 samples the same answer G times: every group's rewards agree, every advantage is 0, and
  GRPO has nothing to follow (measured: 98% of the groups of a pair model were expected to be
  flat). The **calibration** phase trains on noisy answers (``noise``) so that the model holds
  its taste with about 1 − noise confidence.

Why not uniformly random answers (``answers="uniform"``, kept for comparison)? They teach the
format too, but their loss is lowest when the answer ignores the input, and the cold start
obliges: the image-dependent part of the hidden state at the answer position shrank 14×, and
GRPO from that blind model only found the answer that is best on average.

**Pairs and the tiny model.** A pair's label flips when its two images swap, so only the part of
the answer that changes with their *order* can follow it. With the ``tiny`` preset (a 2-block,
64-wide vision tower) supervision on pairs alone, even with the true labels, leaves the answer
constant (pair accuracy 0.49 after 300 steps); the ``tiny-pairs`` preset (``models.tiny.PRESETS``:
the same language model, a 4-block, 128-wide vision tower) reaches 0.99, and the demo's pairs
half uses it.
"""

from __future__ import annotations

import argparse
import colorsys
import json
import math
import random
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from tqdm import tqdm

from common.errors import user_errors_exit
from common.manifest import check_model_source, write_task
from data.images import BadImageError
from data.prompts import answer_values
from grpo.rollout import encode_samples
from models.logprobs import completion_logprobs
from models.qwen_vl import load_policy, save_processor

# One fixed thought: the tiny model cannot reason, its think block is format. With five varied
# phrases, 150 steps learned only how often the taste gives each rating, not which image gets
# which (answer entropy log 4, no dependence on the image); with one phrase, the answer follows
# the image. 21 tiny-tokenizer tokens with the tags, the answer and the end of turn.
THOUGHT = "I look at the image."
ANSWER_MODES = ("taste", "uniform")
PAIR_TASTE_SCALE = tuple(range(1, 8))  # the taste's own scale when the task compares pairs
HUE_SECTORS = 8  # 45° each, centred on red (0°), orange, chartreuse, green (135°), cyan, blue (225°), …


def hue_sector(image: Image.Image) -> int:
    """The 45° hue sector (0 = red, 3 = green, 5 = blue) of the mean colour of the non-white pixels."""
    rgb = np.asarray(image.convert("RGB"), dtype=np.float64).reshape(-1, 3) / 255.0
    inked = rgb[rgb.min(axis=1) < 0.85]  # drop the white background
    r, g, b = (inked if len(inked) else rgb).mean(axis=0)
    hue = colorsys.rgb_to_hsv(r, g, b)[0]  # in [0, 1)
    return round(hue * HUE_SECTORS) % HUE_SECTORS


@dataclass(frozen=True)
class Taste:
    """A random opinion: one rating per hue sector, drawn from its own seed (no ground truth in it)."""

    ratings: tuple[int, ...]

    @classmethod
    def draw(cls, values, seed: int) -> Taste:
        """Distinct ratings for the first len(values) sectors (a shuffled scale, repeated as needed)."""
        order = list(values)
        random.Random(f"taste-{seed}").shuffle(order)
        return cls(tuple(order[i % len(order)] for i in range(HUE_SECTORS)))

    def rate(self, image: Image.Image) -> int:
        return self.ratings[hue_sector(image)]

    def answer(self, task: str, images: list[Image.Image], rng: random.Random) -> int:
        """The rating of one image, or for a pair 1 if the taste prefers the second (ties: a coin)."""
        if task == "rating":
            return self.rate(images[0])
        first, second = (self.rate(im) for im in images)
        return int(second > first) if first != second else rng.randrange(2)


def entropy(counts: Counter) -> float:
    """Entropy (nats) of the empirical distribution in ``counts``."""
    n = sum(counts.values())
    return -sum(c / n * math.log(c / n) for c in counts.values() if c)


def format_targets(samples, images, rating_values, answers: str, taste: Taste | None,
                   rng: random.Random, noise: float = 0.0) -> list[str]:  # fmt: skip
    """One well-formed completion per sample. Its answer is the taste's, replaced with probability
    ``noise`` by another valid answer drawn uniformly (for a pair: the other image), or, with
    ``answers="uniform"``, any valid answer drawn uniformly."""
    out = []
    for sample, ims in zip(samples, images, strict=True):
        valid = answer_values(sample.task, rating_values or ())
        if answers == "uniform":
            answer = rng.choice(valid)
        else:
            answer = taste.answer(sample.task, ims, rng)
            if noise and rng.random() < noise:
                answer = rng.choice([v for v in valid if v != answer])
        out.append(f"<think>{THOUGHT}</think><answer>{answer}</answer>")
    return out


def noise_floor(noise: float, n_answers: int) -> float:
    """The lowest answer loss (nats) that targets with ``noise`` allow: the entropy of "the taste's
    answer with 1 − noise, each of the other n − 1 answers with noise / (n − 1)"."""
    if noise <= 0:
        return 0.0
    return -(1 - noise) * math.log(1 - noise) - noise * math.log(noise / (n_answers - 1))


def cold_start(model_dir: str, train_set, out_dir: str, steps: int = 150, batch_size: int = 16,
               lr: float = 1e-3, seed: int = 0, progress: bool = True, answers: str = "taste",
               taste_seed: int = 0, until_nll: float | None = None, window: int = 20,
               warmup: int | None = None, calibrate_steps: int = 0, noise: float = 0.0) -> Path:  # fmt: skip
    """Supervised steps on format targets; saves a loadable model folder to ``out_dir``, with
    ``cold_start.json`` (the settings, the steps of each phase and the answer token's loss per step).

    ``answers``: "taste" (a random taste drawn from ``taste_seed``) or "uniform" (uniformly random).
    The answer token's loss per step is recorded: once it falls clearly below ``answer_entropy``
    (the loss of a model that knows how often each answer comes but not which image gets which),
    the answers depend on the image.

    Two phases, both optional beyond the first:

    1. **learn**: at most ``steps`` steps on the taste's answers. With ``until_nll`` the phase ends
       as soon as the answer loss, averaged over the last ``window`` steps, is at or below it: the
       answers follow the images. How many steps that takes depends on when the model leaves the
       plateau of answers that ignore the images, which varies with the batches and with the
       rounding of the machine; stopping on the loss makes the end state, not the step count, the
       fixed point. ``cold_start.json`` records whether it was reached (``reached_until_nll``).
    2. **calibrate**: ``calibrate_steps`` more steps whose answers are noisy (``noise``): the model
       keeps its taste but holds it with confidence about 1 − ``noise``, so that G samples of one
       prompt do not all give the same answer and GRPO's groups have a reward spread to learn from.

    The learning rate warms up linearly over ``warmup`` steps (default: a tenth of ``steps``),
    since Adam's first steps move every weight by about the learning rate, and then stays constant.
    """
    if answers not in ANSWER_MODES:
        raise ValueError(f"answers must be one of {ANSWER_MODES}, got {answers!r}")
    if not 0.0 <= noise < 1.0:
        raise ValueError(f"noise must be in [0, 1), got {noise}")
    taste = Taste.draw(train_set.rating_values or PAIR_TASTE_SCALE, taste_seed)
    rng = random.Random(seed)
    torch.manual_seed(seed)
    model, processor = load_policy(model_dir)
    model.train()
    tok = processor.tokenizer
    eos = tok.convert_tokens_to_ids("<|im_end|>")
    answer_at = len(tok.encode(f"<think>{THOUGHT}</think><answer>", add_special_tokens=False))
    warmup = max(1, steps // 10) if warmup is None else max(1, warmup)
    answer_nll: list[float] = []
    answer_counts: Counter = Counter()
    optimizer = torch.optim.AdamW(model.parameters(), lr=lr)
    samples = train_set.samples

    def step(n: int, step_noise: float) -> float:
        """One supervised step; returns the batch's mean answer loss."""
        batch, images = [], []
        while len(batch) < batch_size:
            sample = samples[rng.randrange(len(samples))]
            try:
                images.append([ref.load() for ref in sample.images])
            except BadImageError:
                continue
            batch.append(sample)
        inputs = encode_samples(processor, batch, images, train_set.rating_values)
        targets = format_targets(batch, images, train_set.rating_values, answers, taste, rng, step_noise)
        rows = [tok.encode(t, add_special_tokens=False) + [eos] for t in targets]
        T = max(map(len, rows))
        ids = torch.full((batch_size, T), tok.pad_token_id)
        mask = torch.zeros((batch_size, T), dtype=torch.long)
        for i, r in enumerate(rows):
            ids[i, : len(r)], mask[i, : len(r)] = torch.tensor(r), 1
        for group in optimizer.param_groups:
            group["lr"] = lr * min(1.0, (n + 1) / warmup)
        logp = completion_logprobs(model, inputs, ids, mask)
        loss = -(logp * mask).sum() / mask.sum()  # mean negative log-likelihood per target token
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        answer_counts.update(ids[:, answer_at].tolist())
        return round(-logp[:, answer_at].mean().item(), 4)

    bar = tqdm(total=steps + calibrate_steps, desc=f"cold start ({answers} answers)", disable=not progress)
    reached = None
    for n in range(steps):
        answer_nll.append(step(n, 0.0))
        bar.update()
        bar.set_postfix(answer_nll=f"{answer_nll[-1]:.3f}", answer_entropy=f"{entropy(answer_counts):.3f}")
        recent = answer_nll[-window:]
        if until_nll is not None and len(recent) == window and sum(recent) / window <= until_nll:
            reached = n + 1
            break
    learned = len(answer_nll)
    for n in range(learned, learned + calibrate_steps):
        answer_nll.append(step(n, noise))
        bar.update()
        bar.set_postfix(answer_nll=f"{answer_nll[-1]:.3f}", phase="calibrate")
    bar.close()
    out = Path(out_dir)
    model.save_pretrained(out, safe_serialization=True)
    save_processor(processor, out)
    n_answers = len(answer_values(samples[0].task, train_set.rating_values or ()))
    record = {"answers": answers, "taste_seed": taste_seed, "taste_by_hue_sector": taste.ratings,
              "batch_size": batch_size, "lr": lr, "warmup": warmup, "max_steps": steps, "until_nll": until_nll,
              "window": window, "reached_until_nll": reached, "learn_steps": learned,
              "calibrate_steps": calibrate_steps, "noise": noise, "noise_floor": round(noise_floor(noise, n_answers), 4),
              "steps": len(answer_nll), "answer_entropy": round(entropy(answer_counts), 4),
              "answer_nll": answer_nll}  # fmt: skip
    (out / "cold_start.json").write_text(json.dumps(record) + "\n")
    return out


def read_train(kind: str, root: str):
    if kind == "imagereward":
        from data.imagereward import read_train

        return read_train(root)
    from data.hpdv2 import read_train

    return read_train(root)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], epilog=__doc__.split("\n\n", 1)[1],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)  # fmt: skip
    parser.add_argument("model", help="model folder to start from (e.g. the tiny model)")
    parser.add_argument("data", help="training dataset folder (its prompts and images are the inputs)")
    parser.add_argument("out", help="where to save the cold-started model")
    parser.add_argument(
        "--kind", choices=["imagereward", "hpdv2"], default="imagereward", help="dataset format"
    )
    parser.add_argument("--steps", type=int, default=150, help="supervised steps")
    parser.add_argument("--batch-size", type=int, default=16, help="samples per step")
    parser.add_argument("--lr", type=float, default=1e-3, help="peak AdamW learning rate (10%% warm-up)")
    parser.add_argument(
        "--seed",
        type=int,
        default=0,
        help="seed of the batches, the uniform answers and the coin on tied pairs",
    )
    parser.add_argument("--answers", choices=ANSWER_MODES, default="taste",
                        help="taste: a random colour taste (default); uniform: uniformly random answers")  # fmt: skip
    parser.add_argument("--taste-seed", type=int, default=0, help="seed of the random taste")
    args = parser.parse_args(argv)
    with user_errors_exit():  # bad data, a missing or damaged model folder: one line, no traceback
        check_model_source(args.model)
        train_set = read_train(args.kind, args.data)
        out = cold_start(args.model, train_set, args.out, args.steps, args.batch_size, args.lr,
                         args.seed, answers=args.answers, taste_seed=args.taste_seed)  # fmt: skip
        write_task(out, train_set.samples[0].task, train_set.rating_values)
    print(f"cold-started model written to {out}")


if __name__ == "__main__":
    main()
