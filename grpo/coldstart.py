"""Format-only supervised cold start for the tiny model: ``python -m grpo.coldstart MODEL DATA OUT``.

A real Qwen2.5-VL-Instruct follows the ``<think>…</think><answer>…</answer>`` instruction out of
the box; a randomly initialised tiny model does not, so GRPO would see zero reward everywhere
and learn nothing. This stage teaches the tiny model the answer *format* only: the targets are

    <think>{a neutral phrase}</think><answer>{a uniformly random valid answer}</answer><|im_end|>

so no preference knowledge leaks in (the answer is independent of the image and the human
label). After it the tiny model stands in for an instruction-following VLM with no preference
skill. It is not part of the paper's method and is never used with a real checkpoint.
"""

from __future__ import annotations

import argparse
import random
from pathlib import Path

import torch
from tqdm import tqdm

from data.images import BadImageError
from data.prompts import answer_values
from grpo.rollout import encode_samples
from models.qwen_vl import completion_logprobs, load_policy, save_processor

NEUTRAL_THOUGHTS = (
    "I look at the image.",
    "the image shows a shape.",
    "I check the picture and the prompt.",
    "let me judge this image.",
    "I compare what is drawn with the prompt.",
)


def format_targets(task: str, rating_values, n: int, rng: random.Random) -> list[str]:
    """``n`` well-formed completions whose answers are uniformly random valid values."""
    values = answer_values(task, rating_values or ())
    return [
        f"<think>{rng.choice(NEUTRAL_THOUGHTS)}</think><answer>{rng.choice(values)}</answer>"
        for _ in range(n)
    ]


def cold_start(model_dir: str, train_set, out_dir: str, steps: int = 150, batch_size: int = 16,
               lr: float = 1e-3, seed: int = 0, progress: bool = True) -> Path:  # fmt: skip
    """Supervised steps on random-answer targets; saves a loadable model folder to ``out_dir``."""
    rng = random.Random(seed)
    torch.manual_seed(seed)
    model, processor = load_policy(model_dir)
    model.train()
    tok = processor.tokenizer
    eos = tok.convert_tokens_to_ids("<|im_end|>")
    optimizer = torch.optim.AdamW(model.parameters(), lr=lr)
    samples = train_set.samples
    bar = tqdm(range(steps), desc="cold start (format only)", disable=not progress)
    for step in bar:
        batch, images = [], []
        while len(batch) < batch_size:
            sample = samples[rng.randrange(len(samples))]
            try:
                images.append([ref.load() for ref in sample.images])
            except BadImageError:
                continue
            batch.append(sample)
        inputs = encode_samples(processor, batch, images, train_set.rating_values)
        targets = format_targets(batch[0].task, train_set.rating_values, batch_size, rng)
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
        bar.set_postfix(nll=f"{loss.item():.3f}")
    out = Path(out_dir)
    model.save_pretrained(out, safe_serialization=True)
    save_processor(processor, out)
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
    parser.add_argument("--kind", choices=["imagereward", "hpdv2"], default="imagereward")
    parser.add_argument("--steps", type=int, default=150)
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--lr", type=float, default=1e-3)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    out = cold_start(
        args.model,
        read_train(args.kind, args.data),
        args.out,
        args.steps,
        args.batch_size,
        args.lr,
        args.seed,
    )
    print(f"cold-started model written to {out}")


if __name__ == "__main__":
    main()
