"""Supervised cold start for the tiny model: ``python -m grpo.coldstart MODEL DATA OUT``.

A real Qwen2.5-VL-Instruct brings two things to the paper's zero-shot starting point that a
randomly initialised tiny model lacks: it follows the ``<think>…</think><answer>…</answer>``
instruction, and it has *some* opinion about what it sees. This stage gives the tiny model both
and no knowledge of the preference it will be trained on. The targets are

    <think>I look at the image.</think><answer>{the answer of a random taste}</answer><|im_end|>

where the **random taste** (``Taste``) rates an image by its dominant hue through a map drawn
from its own seed, independent of the hidden ground truth of the synthetic data: it is as likely
to reverse the true preference as to agree with it (its agreement is the zero-shot accuracy the
demo reports). For a pair the answer names the image the taste rates higher.

Why not uniformly random answers (``answers="uniform"``, kept for comparison)? They teach the
format too, but their loss is lowest when the answer ignores the input, and the cold start
obliges: on the demo's data the image-dependent part of the hidden state at the answer position
shrank 14× (0.63 → 0.044 against a norm of 11), and GRPO from that blind model only found the
answer that is best on average (issue 6 notes). From a random taste it re-maps colours to the
true ratings within a few hundred steps.

How long it runs matters. Too short, and the answers do not yet depend on the image:
``cold_start.json`` shows this, because the answer loss stays near the entropy of the answers.
Far longer (300 steps on the demo's data), and GRPO stalls with two colours on one rating,
because the KL term's frozen reference holds on to the taste. This stage is not part of the
paper's method and is never used with a real checkpoint.

**Pairs and the tiny model** (issue 14). A pair's label flips when its two images swap, so only
the part of the answer that changes with their *order* can follow it; the part that is symmetric
in the two images can only learn how often each answer comes. With the ``tiny`` preset (a 2-block,
64-wide vision tower) that antisymmetric part is tiny: at the answer position of 48 test pairs,
the image-dependent part of the final hidden state has norm 0.66 (of 11.3) but its antisymmetric
part 0.022. Supervision on pairs alone then pushes on the base rate and the answer stays constant
(300 steps, even with the true labels: pair accuracy 0.49). Two ways out were measured:

- the ``tiny-pairs`` preset (``models.tiny.PRESETS``: the same language model, a 4-block,
  128-wide vision tower) learns pairs alone: 0.99 pair accuracy after 300 steps with the true
  labels; a 128-wide tower of 2 blocks or a 4-layer language model does not (0.49). The demo's
  pairwise run uses it with a cold start on pairs alone (``pair_set`` unset, taste answers);
- a **mixed** cold start (``pair_set``) on the ``tiny`` preset: half of every batch the taste's
  ratings of single images, which build a per-image value from the full image-dependent part;
  the pair half only has to read it out by order (after 250 mixed steps the antisymmetric part
  is 8.07 of an image-dependent 8.23). GRPO from there learned to rate the second image rather
  than compare the two (pair accuracy 0.84 at best, 0.51 on two other seeds); ``pair_flip``
  (a share of flipped pair answers) kept its groups from drawing one answer eight times.
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
                   rng: random.Random, pair_flip: float = 0.0) -> list[str]:  # fmt: skip
    """One well-formed completion per sample; its answer comes from the taste (a pair's answer
    flipped with probability ``pair_flip``) or uniformly at random."""
    out = []
    for sample, ims in zip(samples, images, strict=True):
        if answers == "taste":
            answer = taste.answer(sample.task, ims, rng)
            if sample.task == "pair" and rng.random() < pair_flip:
                answer = 1 - answer
        else:
            answer = rng.choice(answer_values(sample.task, rating_values or ()))
        out.append(f"<think>{THOUGHT}</think><answer>{answer}</answer>")
    return out


def cold_start(model_dir: str, train_set, out_dir: str, steps: int = 150, batch_size: int = 16,
               lr: float = 1e-3, seed: int = 0, progress: bool = True, answers: str = "taste",
               taste_seed: int = 0, pair_set=None, pair_flip: float = 0.0) -> Path:  # fmt: skip
    """Supervised steps on format targets; saves a loadable model folder to ``out_dir``, with
    ``cold_start.json`` (the settings, the steps run and the answer token's loss per step).

    ``answers``: "taste" (a random taste drawn from ``taste_seed``) or "uniform" (uniformly random).
    The answer token's loss per step is recorded: once it falls clearly below ``answer_entropy``
    (the loss of a model that knows how often each answer comes but not which image gets which),
    the answers depend on the image.

    ``pair_set`` (HPDv2-format pairs beside an ImageReward-format ``train_set``): a **mixed**
    cold start. Every batch takes half its samples from each set, and one taste answers both: a
    rating for one image, and for a pair the image it rates higher. The pair answers alone do
    not make the tiny model look at the images (see the module docstring); the rating half does.
    ``pair_flip``: the probability that a pair's answer is flipped, so the model holds its taste
    with about 1 − ``pair_flip`` confidence and GRPO's groups keep sampling both answers.
    """
    if answers not in ANSWER_MODES:
        raise ValueError(f"answers must be one of {ANSWER_MODES}, got {answers!r}")
    if pair_set is not None and not train_set.rating_values:
        raise ValueError("a mixed cold start takes the ratings set as train_set and the pairs as pair_set")
    taste = Taste.draw(train_set.rating_values or PAIR_TASTE_SCALE, taste_seed)
    rng = random.Random(seed)
    torch.manual_seed(seed)
    model, processor = load_policy(model_dir)
    model.train()
    tok = processor.tokenizer
    eos = tok.convert_tokens_to_ids("<|im_end|>")
    answer_at = len(tok.encode(f"<think>{THOUGHT}</think><answer>", add_special_tokens=False))
    answer_nll: list[float] = []
    answer_counts: Counter = Counter()
    pair_nll: list[float] = []  # mixed: the answer loss of the pair half alone (against pair_counts)
    pair_counts: Counter = Counter()
    optimizer = torch.optim.AdamW(model.parameters(), lr=lr)
    pools = [train_set.samples] + ([pair_set.samples] if pair_set is not None else [])
    bar = tqdm(range(steps), desc=f"cold start (format, {answers} answers)", disable=not progress)
    for step in bar:
        batch, images = [], []
        while len(batch) < batch_size:
            samples = pools[len(batch) * len(pools) // batch_size]  # equal shares of each set
            sample = samples[rng.randrange(len(samples))]
            try:
                images.append([ref.load() for ref in sample.images])
            except BadImageError:
                continue
            batch.append(sample)
        inputs = encode_samples(processor, batch, images, train_set.rating_values)
        targets = format_targets(batch, images, train_set.rating_values, answers, taste, rng, pair_flip)
        rows = [tok.encode(t, add_special_tokens=False) + [eos] for t in targets]
        T = max(map(len, rows))
        ids = torch.full((batch_size, T), tok.pad_token_id)
        mask = torch.zeros((batch_size, T), dtype=torch.long)
        for n, r in enumerate(rows):
            ids[n, : len(r)], mask[n, : len(r)] = torch.tensor(r), 1
        for group in optimizer.param_groups:  # 10% linear warm-up: Adam's first steps move every weight by lr
            group["lr"] = lr * min(1.0, (step + 1) / max(1, steps // 10))
        logp = completion_logprobs(model, inputs, ids, mask)
        loss = -(logp * mask).sum() / mask.sum()  # mean negative log-likelihood per target token
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        answer_nll.append(round(-logp[:, answer_at].mean().item(), 4))
        answer_counts.update(ids[:, answer_at].tolist())
        if pair_set is not None:  # the pairs are the second half of the batch
            pair_nll.append(round(-logp[batch_size // 2 :, answer_at].mean().item(), 4))
            pair_counts.update(ids[batch_size // 2 :, answer_at].tolist())
        bar.set_postfix(nll=f"{loss.item():.3f}", answer_nll=f"{answer_nll[-1]:.3f}",
                        answer_entropy=f"{entropy(answer_counts):.3f}")  # fmt: skip
    out = Path(out_dir)
    model.save_pretrained(out, safe_serialization=True)
    save_processor(processor, out)
    record = {"answers": answers, "taste_seed": taste_seed, "taste_by_hue_sector": taste.ratings,
              "mixed": pair_set is not None, "pair_flip": pair_flip, "steps": steps, "batch_size": batch_size, "lr": lr,
              "answer_entropy": round(entropy(answer_counts), 4), "answer_nll": answer_nll}  # fmt: skip
    if pair_set is not None:
        record |= {"pair_answer_entropy": round(entropy(pair_counts), 4), "pair_answer_nll": pair_nll}
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
