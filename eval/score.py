"""Scoring images with a reasoning judge: soft and hard scores, anchor ranking, Mean@k.

A *request* is one question to the model: a rating of one image, or a comparison of two images
of the same prompt. Each request is answered by ``k`` reasoning rollouts
(``sample_completions(group_size=k)``: the request is prefilled once and our own sampling loop
continues it k times; plain ``generate`` only where no KV cache is available), and every rollout
gets two scores:

- **soft** (arXiv 2503.19948's soft reward, ``models.soft_head.soft_scores``): the expectation of the
  answer under the model's answer-token distribution, read at the answer position after the
  model's own reasoning: ``E[r | C] = Σ_i r_i p(r_i | C)`` over the rating scale, or
  ``p(1 | C) = e^{f(1)} / (e^{f(0)} + e^{f(1)})`` for a pair (the second image is better). A
  rollout without a usable answer is still scored, after appending ``</think><answer>``. The
  answer logits are read at τ = 1 whatever ``temperature`` sampled the rollout.
- **hard**: the answer the rollout actually wrote (``data.prompts.parse_completion``). A rollout
  without a well-formed answer gets ``min(scale) − 1`` for a rating, so that it ranks below every
  valid answer, and ``0.5`` for a pair, i.e. "no preference" (the anchor's own score).

**Mean@k**: a request's score is the mean of its first k rollout scores. One run with k rollouts
also yields Mean@1 (the first rollout of every request), so ``scores`` hold ``soft@1``,
``hard@1`` and, for k > 1, ``soft@k``, ``hard@k``.

Per group of N images (one prompt) a *method* turns request scores into N image scores:

| method        | requests                                  | image score                        |
|---------------|-------------------------------------------|------------------------------------|
| ``rating``    | N ratings                                 | Mean@k of E[r|C] (soft) / r (hard)  |
| ``anchor``    | N − 1 pairs ``[anchor, j]`` (×2 debiased) | p(j ≻ anchor); the anchor gets 0.5  |
| ``round-robin`` | N(N−1)/2 pairs (×2 debiased)            | Bradley–Terry log-strength          |

(see ``eval.pairwise``). ``score_groups`` streams groups through fixed-size batches of
requests from several prompts, so a batch is always full and memory holds one batch of images.
Sampling is random: seed torch before calling (``seeded``) for reproducible scores. With
``ScoringSpec.seed_per_request`` each request instead draws its rollouts from generators of its
own, seeded by ``(seed, group id, request index, rollout)`` (``request_seed``, ``rollout_seeds``):
a request then gets the same rollouts whatever else shares its batch and in whatever order
(``eval.rank``, ``eval.batch`` and the server run this way).

Shapes: ``B`` requests in a batch, ``k`` rollouts each, ``N = B·k`` completions, ``T`` tokens.
"""

from __future__ import annotations

import contextlib
import zlib
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field

import numpy as np
import torch
from PIL import Image

from common.config import SamplingSpec
from data.prompts import answer_values, messages_for, parse_completion
from eval.pairwise import (
    anchor_comparisons,
    anchor_scores,
    choose_anchor,
    round_robin_comparisons,
    round_robin_scores,
)
from models.kv_cache import kv_cache_available
from models.qwen_vl import build_inputs, render_prompt, repeat_inputs
from models.sampling import draw_tokens, draw_tokens_per_row, sample_completions, sample_shared_first_image
from models.soft_head import answer_choice, answer_logits, answer_score

METHODS = ("rating", "anchor", "round-robin")
NO_PAIR_ANSWER = 0.5  # hard score of a comparison without a well-formed answer: no preference


@dataclass(frozen=True)
class ScoringSpec:
    """How to score: the method, the rollouts and the batch. Validated on construction."""

    method: str = "rating"
    """rating | anchor | round-robin (see the module table)."""
    rating_values: tuple[int, ...] = ()
    """The rating scale the model answers on (method rating), e.g. (1, …, 7)."""
    k: int = 1
    """Mean@k: reasoning rollouts per request, sampled in one generate."""
    max_new_tokens: int = SamplingSpec.max_new_tokens
    """Completion length limit."""
    temperature: float = SamplingSpec.temperature
    """Sampling temperature of the rollouts (the soft scores themselves are read at τ = 1)."""
    batch_size: int = 16
    """Requests per generate call (each sampled k times), drawn from several prompts."""
    seed: int = 0
    """Seed of the anchor draw (combined with the group id)."""
    debias: bool = False
    """Pairwise methods: also ask every comparison with the images swapped and average."""
    bt_prior: float = 0.1
    """Round robin: λ drawn virtual games per pair in the Bradley–Terry fit."""
    share_anchor: bool = True
    """Anchor method: prefill the instructions + anchor image once per group and reuse that KV
    cache for its N − 1 comparisons (``models.sampling.sample_shared_first_image``). Same samples
    for the same seed; only the cost changes."""
    seed_per_request: bool = False
    """Draw each request's rollouts from generators of its own (``request_seed``): its scores then
    do not depend on the batch size, the other requests in its batch or their order. Off: one
    stream for the whole run (seed it with ``seeded``)."""

    def __post_init__(self) -> None:
        if self.method not in METHODS:
            raise ValueError(f"unknown scoring method {self.method!r}; expected one of {METHODS}")
        if self.method == "rating" and not self.rating_values:
            raise ValueError("method 'rating' needs a rating scale (rating_values)")
        if self.method == "rating" and self.debias:
            raise ValueError("debias applies to the pairwise methods (anchor, round-robin), not to rating")
        if self.k < 1 or self.batch_size < 1 or self.max_new_tokens < 1:
            raise ValueError(f"k, batch_size and max_new_tokens must be ≥ 1 (got {self.k}, "
                             f"{self.batch_size}, {self.max_new_tokens})")  # fmt: skip

    @property
    def sampling(self) -> SamplingSpec:
        """How the rollouts are sampled (each request prefilled once for its k rollouts)."""
        return SamplingSpec(self.max_new_tokens, self.temperature)

    @property
    def task(self) -> str:
        return "rating" if self.method == "rating" else "pair"

    @property
    def values(self) -> tuple[int, ...]:
        """The valid answers: the rating scale or (0, 1)."""
        return answer_values(self.task, self.rating_values)

    @property
    def ks(self) -> tuple[int, ...]:
        """The Mean@k figures one run yields: (1,) or (1, k)."""
        return (1,) if self.k == 1 else (1, self.k)


@dataclass
class Request:
    """One question: ``task`` "rating" (one image) or "pair" (two images, answer 1 = second better)."""

    task: str
    prompt: str
    images: list[Image.Image]
    seed: int | None = None  # the request's own seed (``request_seed``); None: the global stream


def request_seed(seed: int, group_id: str, index: int) -> int:
    """The seed of request ``index`` of group ``group_id`` under run seed ``seed`` (≥ 0).

    Mixed by NumPy's ``SeedSequence`` (the group id hashed with CRC-32, stable across processes), so
    neighbouring seeds, groups and requests get unrelated streams.
    """
    words = [seed, zlib.crc32(group_id.encode("utf-8")), index]
    return int(np.random.SeedSequence(words).generate_state(1, np.uint64)[0] >> 1)  # < 2^63


def rollout_seeds(seeds_B: list[int], k: int) -> list[int]:
    """The generator seed of each of the ``N = B·k`` rollout rows (row n: request n // k, rollout n % k)."""
    return [int(np.random.SeedSequence([s, j]).generate_state(1, np.uint64)[0] >> 1) for s in seeds_B
            for j in range(k)]  # fmt: skip


@dataclass
class Judgement:
    """The k rollouts of one request and their scores, in sampling order (lists of length k)."""

    texts: list[str]
    soft: list[float]
    hard: list[float]
    well_formed: list[bool]
    fallback: list[bool]  # the soft score needed the appended answer prefix
    ids_kT: torch.Tensor  # (k, T) completion tokens, right padded
    mask_kT: torch.Tensor  # (k, T)
    choice: list[float] = field(default_factory=list)  # the soft distribution's most probable answer

    def mean(self, which: str, k: int) -> float:
        """Mean@k: the mean ``soft`` or ``hard`` score of the first k rollouts."""
        values = getattr(self, which)
        if not 1 <= k <= len(values):
            raise ValueError(f"Mean@{k} of {len(values)} rollouts")
        return sum(values[:k]) / k


def hard_scores(texts: list[str], task: str, values: tuple[int, ...]) -> tuple[list[float], list[bool]]:
    """The written answer of each completion, or the no-answer value; and whether it was well formed.

    No answer: ``min(values) − 1`` for a rating (below every valid rating), 0.5 for a pair.
    """
    missing = float(min(values) - 1) if task == "rating" else NO_PAIR_ANSWER
    parsed = [parse_completion(t, values) for t in texts]
    return [float(p.answer) if p.well_formed else missing for p in parsed], [p.well_formed for p in parsed]


def encode_requests(
    processor, requests: list[Request], rating_values: tuple[int, ...]
) -> dict[str, torch.Tensor]:
    """The chat prompts of B requests with their images, as one left-padded batch (see ``build_inputs``)."""
    texts = [
        render_prompt(processor, messages_for(r.task, r.prompt, len(r.images), rating_values))
        for r in requests
    ]
    return build_inputs(processor, texts, [r.images for r in requests])


def score_completions(
    model, processor, inputs_N: dict, ids_NT: torch.Tensor, mask_NT: torch.Tensor, texts: list[str],
    task: str, values: tuple[int, ...],
) -> tuple[list[float], list[float], list[bool], list[bool], list[float]]:  # fmt: skip
    """Soft and hard scores of given completions; ``inputs_N`` holds one prompt row per completion.

    Returns ``(soft_N, hard_N, well_formed_N, fallback_N, choice_N)`` as lists, ``choice_N`` the
    most probable answer of the distribution the soft score averages over. Separate from sampling
    so that fixed completions can be re-scored (the tests compare batched and one-at-a-time scores).
    """
    logits_NA, fallback_N = answer_logits(model, processor, inputs_N, ids_NT, mask_NT, texts, values)
    soft_N = answer_score(logits_NA, list(range(len(values))), values)
    hard_N, well_formed_N = hard_scores(texts, task, values)
    return (
        soft_N.tolist(),
        hard_N,
        well_formed_N,
        fallback_N.tolist(),
        answer_choice(logits_NA, values).tolist(),
    )


@torch.no_grad()
def judge(
    model, processor, requests: list[Request], rating_values: tuple[int, ...], k: int,
    sampling: SamplingSpec, share_first_image: bool = False,
) -> list[Judgement]:  # fmt: skip
    """Answer B requests with k rollouts each: one sampling pass for all B·k, then one scoring pass.

    Each request is prefilled once for its k rollouts (``sampling.share_prefix``). With
    ``share_first_image`` (pair requests), requests that open with the same prompt and first image
    (the anchor method's ``[anchor, j]``) also share the prefill of that opening. Both draw, for
    the same seed, the same rollouts as one plain ``generate``. Without a KV cache (gradient
    checkpointing in training mode) every request goes through ``generate``.

    Requests that carry a ``seed`` draw their rollouts from generators of their own
    (``rollout_seeds``); then every request of the batch must carry one, and a KV cache is needed.
    """
    tasks = {r.task for r in requests}
    assert len(tasks) == 1, f"one task per batch, got {tasks}"
    task = tasks.pop()
    values = answer_values(task, rating_values)
    device = next(model.parameters()).device
    inputs = {name: t.to(device) for name, t in encode_requests(processor, requests, rating_values).items()}
    cached, s = kv_cache_available(model), sampling
    seeds = [r.seed for r in requests]
    draw = draw_tokens
    if any(x is not None for x in seeds):
        if None in seeds or not (cached and s.share_prefix):
            raise ValueError("per-request seeds need a seed on every request of the batch and the "
                             "shared-prefix sampling loop (a KV cache, share_prefix)")  # fmt: skip
        draw = draw_tokens_per_row(rollout_seeds(seeds, k))
    if share_first_image and cached and task == "pair":
        comp = sample_shared_first_image(
            model, processor, inputs, k, s.max_new_tokens, s.temperature, draw=draw
        )
    else:
        comp = sample_completions(model, processor, inputs, k, s.max_new_tokens, s.temperature,
                                  share_prefix=s.share_prefix and cached, draw=draw)  # fmt: skip
    inputs_N = repeat_inputs(inputs, k)  # row n is request n // k
    soft, hard, ok, fb, choice = score_completions(
        model, processor, inputs_N, comp.ids_NT, comp.mask_NT, comp.texts, task, values
    )
    out = []
    for b in range(len(requests)):
        rows = slice(b * k, (b + 1) * k)
        out.append(Judgement(comp.texts[rows], soft[rows], hard[rows], ok[rows], fb[rows],
                             comp.ids_NT[rows].cpu(), comp.mask_NT[rows].cpu(), choice[rows]))  # fmt: skip
    return out


@contextlib.contextmanager
def seeded(seed: int):
    """Seed torch for the block and restore every RNG afterwards (a train loop's stream is untouched)."""
    devices = list(range(torch.cuda.device_count())) if torch.cuda.is_available() else []
    with torch.random.fork_rng(devices=devices):
        torch.manual_seed(seed)
        yield


# --------------------------------------------------------------------------------- groups


@dataclass
class GroupResult:
    """One prompt's images scored: its requests (image indices), their judgements, the image scores.

    ``scores["soft@1"][i]`` is image i's score from the first rollouts; ``"soft@k"`` (k > 1) is
    Mean@k; the same for ``"hard@…"``. ``anchor`` is set for the anchor method.
    """

    group_id: str
    prompt: str
    n_images: int
    anchor: int | None
    requests: list[tuple[int, ...]]
    judgements: list[Judgement] = field(default_factory=list)
    scores: dict[str, list[float]] = field(default_factory=dict)


def plan_group(spec: ScoringSpec, n: int, group_id: str) -> tuple[int | None, list[tuple[int, ...]]]:
    """``(anchor, requests)``: which images each request shows, in order."""
    if spec.method == "rating":
        return None, [(i,) for i in range(n)]
    if spec.method == "anchor":
        anchor = choose_anchor(n, spec.seed, group_id)
        return anchor, anchor_comparisons(n, anchor, spec.debias)
    return None, round_robin_comparisons(n, spec.debias)


def image_scores(spec: ScoringSpec, result: GroupResult, which: str, k: int) -> list[float]:
    """The N image scores of a group from its requests' Mean@k ``which`` ("soft" | "hard") scores."""
    per_request = [j.mean(which, k) for j in result.judgements]
    n = result.n_images
    if spec.method == "rating":
        order = [i for (i,) in result.requests]
        assert order == list(range(n)), "rating requests are one per image, in order"
        return per_request
    if spec.method == "anchor":
        return anchor_scores(n, result.anchor, result.requests, per_request)
    return round_robin_scores(n, result.requests, per_request, prior=spec.bt_prior)


def image_reasoning(result: GroupResult, spec: ScoringSpec) -> list[str]:
    """Per image, the reasoning of the first rollout of the first request about it: its rating, or
    its comparison with the anchor; "" for the anchor and under round robin."""
    reasoning = [""] * result.n_images
    for idx, j in zip(result.requests, result.judgements):
        about = idx[0] if spec.method == "rating" else idx[1] if idx[0] == result.anchor else None
        if about is not None and not reasoning[about]:
            reasoning[about] = parse_completion(j.texts[0], spec.values).reasoning
    return reasoning


def score_groups(
    model, processor, groups: Iterable[tuple[str, str, list[Image.Image]]], spec: ScoringSpec
) -> Iterator[GroupResult]:
    """Score ``(group_id, prompt, images)`` groups, yielding each ``GroupResult`` as soon as it is complete.

    Requests of consecutive groups share batches of ``spec.batch_size``; a group's images are
    dropped once all its requests are answered. Results come out in input order.
    """
    queue: list[GroupResult] = []  # groups not yet yielded, in input order
    pending: list[tuple[GroupResult, int, Request]] = []  # requests not yet judged

    def run(batch):
        judgements = judge(model, processor, [r for _, _, r in batch], spec.rating_values, spec.k, spec.sampling,
                           share_first_image=spec.share_anchor and spec.method == "anchor")  # fmt: skip
        for (result, i, request), j in zip(batch, judgements):
            result.judgements[i] = j
            request.images = []  # free the decoded images

    def finished() -> Iterator[GroupResult]:
        while queue and all(j is not None for j in queue[0].judgements):
            result = queue.pop(0)
            for k in spec.ks:
                for which in ("soft", "hard"):
                    result.scores[f"{which}@{k}"] = image_scores(spec, result, which, k)
            yield result

    for group_id, prompt, images in groups:
        anchor, plan = plan_group(spec, len(images), group_id)
        result = GroupResult(group_id, prompt, len(images), anchor, plan, [None] * len(plan))
        requests = [Request(spec.task, prompt, [images[i] for i in idx],
                            request_seed(spec.seed, group_id, i) if spec.seed_per_request else None)
                    for i, idx in enumerate(plan)]  # fmt: skip
        queue.append(result)
        pending += [(result, i, r) for i, r in enumerate(requests)]
        while len(pending) >= spec.batch_size:
            run(pending[: spec.batch_size])
            pending = pending[spec.batch_size :]
            yield from finished()
    if pending:
        run(pending)
    yield from finished()
    assert not queue, "every group is finished once every request is judged"


def swapped_answers(model, processor, groups, spec: ScoringSpec) -> tuple[list[float], list[float]]:
    """Ask every comparison ``(a, b)`` of the given ``(GroupResult, images)`` again as ``(b, a)``, one
    rollout each: returns ``(p_ab, p_ba)``, the first rollout's soft answer in each order, for
    ``eval.diagnostics.position_consistency``. Seed torch first (``seeded``)."""
    p_ab, requests = [], []
    for result, images in groups:
        for (a, b), j in zip(result.requests, result.judgements):
            p_ab.append(j.soft[0])
            requests.append(Request("pair", result.prompt, [images[b], images[a]]))
    p_ba = []
    for start in range(0, len(requests), spec.batch_size):
        batch = requests[start : start + spec.batch_size]
        p_ba += [j.soft[0] for j in judge(model, processor, batch, (), 1, spec.sampling)]
    return p_ab, p_ba
