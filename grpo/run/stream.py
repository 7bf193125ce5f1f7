"""The data side of a training run: which samples each rank takes at each step, and what is refused.

``SampleStream`` is the training order of one rank; ``next_batch`` decodes the images of the next
B samples, skipping and counting those that fail. ``check_data_folder`` and ``drop_prompts_too_long``
refuse what would fail later: a missing dataset folder before any model is loaded, prompts longer
than ``data.max_prompt_tokens`` once the tokenizer is.
"""

from __future__ import annotations

from collections import Counter
from pathlib import Path

import numpy as np
from tqdm import tqdm

from common.config import Config
from common.errors import DataError
from data.images import BadImageError
from data.read import TRAIN_HELP
from data.sets import drop_long_prompts


class SampleStream:
    """The training order of one rank: a fresh seeded permutation every epoch, rank r of W
    taking every W-th sample. ``position`` (samples consumed by this rank) is its state, with
    ``start`` and ``done``, which only a resume on another number of ranks sets
    (``continue_order``): the global sequence then begins at index ``start`` and passes over the
    indices in ``done``, which ranks of the previous run had already taken."""

    def __init__(self, n: int, seed: int, rank: int = 0, world: int = 1, position: int = 0,
                 start: int = 0, done: tuple[int, ...] = ()):  # fmt: skip
        self.n, self.seed, self.rank, self.world, self.position = n, seed, rank, world, position
        self.start, self.done = start, tuple(sorted(done))
        self._epoch, self._order = -1, None

    def next_index(self) -> int:
        k = global_index(self.position * self.world + self.rank, self.start, self.done)
        epoch, i = divmod(k, self.n)  # k: the index in the endless sequence of epochs
        if epoch != self._epoch:
            self._epoch, self._order = epoch, np.random.default_rng([self.seed, epoch]).permutation(self.n)
        self.position += 1
        return int(self._order[i])


def global_index(j: int, start: int = 0, done: tuple[int, ...] = ()) -> int:
    """The ``j``-th global index at or after ``start`` that is not in ``done`` (sorted, each ≥ start)."""
    k = start + j
    for d in done:
        if d > k:
            break
        k += 1
    return k


def continue_order(positions: list[int], start: int, done: tuple[int, ...]) -> tuple[int, tuple[int, ...]]:
    """``(start, done)`` for any number of ranks after W = ``len(positions)`` ranks took
    ``positions[r]`` samples each: the global sequence continues at the first index some rank had
    not taken, and passes over those taken beyond it (ranks run unequally far when one skipped an
    undecodable image), so no sample is repeated or skipped."""
    world, low = len(positions), min(positions)
    taken = {global_index(p * world + r, start, done)
             for r, pos in enumerate(positions) for p in range(low, pos)}  # fmt: skip
    new_start = global_index(low * world, start, done)
    earlier = {d for d in done if d >= new_start}
    return new_start, tuple(sorted(taken | earlier))


def next_batch(stream: SampleStream, samples: list, size: int, skipped: Counter) -> tuple[list, list]:
    """``size`` samples with decoded images; samples whose images fail to decode are skipped."""
    batch, images, failures = [], [], 0
    while len(batch) < size:
        sample = samples[stream.next_index()]
        try:
            images.append([ref.load() for ref in sample.images])
        except BadImageError as e:
            skipped["bad image"] += 1
            failures += 1
            tqdm.write(f"skipped sample {sample.sample_id}: {e}")
            if failures > 10 * size + 100:
                raise DataError("too many undecodable images in a row; is the dataset folder intact?") from e
            continue
        batch.append(sample)
    return batch, images


def check_data_folder(cfg: Config) -> None:
    """Fail with instructions before any model is loaded if the dataset folder is missing."""
    for key, root in (("data.root", cfg.data.root), ("eval.root", cfg.eval_root)):
        if not Path(root).is_dir():
            raise DataError(f"dataset folder {root!r} not found: {TRAIN_HELP[cfg.data.kind]}, "
                            f"or point {key}=... at it")  # fmt: skip


def drop_prompts_too_long(train_set, eval_groups: list, tokenizer, max_tokens: int) -> None:
    """Skip and count prompts over ``data.max_prompt_tokens`` (they would exhaust memory)."""
    train_set.samples = drop_long_prompts(
        train_set.samples, tokenizer, max_tokens, train_set.skipped, "sample"
    )
    eval_groups[:] = drop_long_prompts(eval_groups, tokenizer, max_tokens, Counter(), "eval prompt")
    if not train_set.samples:
        raise DataError(f"no training prompt is within data.max_prompt_tokens={max_tokens}: "
                        f"skipped {dict(train_set.skipped)}")  # fmt: skip
