"""Batched scoring across prompts: many (prompt, images) items in as few batched rollouts as a
token budget allows.

A diffusion-RL trainer scores 32–64 fresh (prompt, image) pairs per step, each with a different
prompt; best-of-N selection scores a group per prompt. Here one call scores a list of *items*,
each a prompt with its images:

- one image: a rating (``E[r | C]``) on a rating checkpoint;
- two or more images: every image rated (rating), or ranked by the checkpoint's pairwise method
  (``anchor``: N − 1 comparisons with a seeded anchor, which scores 0.5; ``round-robin``).

Every item becomes its requests (``eval.score.plan_group``, with the prompt as group id, exactly
as ``eval.rank`` plans it); the requests of all items are packed, in item order, into batches
whose estimated token count stays within ``token_budget`` (``request_tokens``: prompt, image and
completion tokens, times k), and each batch is one call of ``eval.score.judge``: one prefill per
request shared by its k rollouts, one prefill of an anchor's opening shared by its comparisons,
one sampling loop for the whole batch, one scoring pass.

**Deterministic per item.** Each request draws its rollouts from generators seeded by the item's
seed, its prompt and the request's index (``eval.score.request_seed``), so an item gets the same
scores whatever else is in the call, in whatever order, and however the budget splits it: equal to
``python -m eval.rank --model DIR --prompt P --seed S IMAGES…`` up to float rounding (padding
changes the shapes of the matrix products, not the draws).

Shapes: ``B`` requests in a batch, ``k`` rollouts each.
"""

from __future__ import annotations

from dataclasses import dataclass, replace

from PIL import Image

from data.prompts import messages_for
from eval.rank import PreferenceScorer
from eval.score import (
    GroupResult,
    Request,
    ScoringSpec,
    image_reasoning,
    image_scores,
    judge,
    plan_group,
    request_seed,
)
from models.qwen_vl import image_token_count, render_prompt

DEFAULT_TOKEN_BUDGET = 32_768
"""Tokens (prompt + images + completion, times k) per batched rollout. The KV cache of the 7B
model costs 56 KiB per token in bfloat16 (28 layers × 2 × 4 KV heads × 128 × 2 bytes), so the
default is about 1.8 GiB of cache; the sampling step's ``(N, V)`` float32 logits add 0.6 MiB a row."""


@dataclass
class Item:
    """One prompt with its images (already decoded, see ``data.images``) and its seed."""

    prompt: str
    images: list[Image.Image]
    seed: int = 0


@dataclass
class ItemResult:
    """One item scored; lists run over its images in input order.

    ``soft``/``hard``: Mean@k scores (``eval.score``); ``parsed[i]``: every rollout of every
    request that showed image i wrote a well-formed answer; ``reasoning[i]``: the first rollout's
    reasoning about image i ("" for the anchor and under round robin); ``requests``: each request's
    image indices with its rollouts' texts and scores.
    """

    soft: list[float]
    hard: list[float]
    parsed: list[bool]
    reasoning: list[str]
    anchor: int | None
    requests: list[dict]

    def to_json(self) -> dict:
        return {"soft": self.soft, "hard": self.hard, "parsed": self.parsed, "reasoning": self.reasoning,
                "anchor": self.anchor, "requests": self.requests}  # fmt: skip


def request_tokens(processor, spec: ScoringSpec, request: Request) -> int:
    """The tokens one request occupies in a batched rollout: its chat prompt with the image tokens,
    plus ``max_new_tokens``, times its k rollouts (an upper bound: rollouts may end earlier)."""
    text = render_prompt(processor, messages_for(request.task, request.prompt, len(request.images),
                                                 spec.rating_values))  # fmt: skip
    text_tokens = len(processor.tokenizer.encode(text, add_special_tokens=False)) - len(request.images)
    image_tokens = sum(image_token_count(processor, im) for im in request.images)
    return (text_tokens + image_tokens + spec.max_new_tokens) * spec.k


def pack(costs: list[int], budget: int) -> list[list[int]]:
    """Consecutive runs of indices whose costs sum to at most ``budget`` (a single larger one alone)."""
    batches, current, used = [], [], 0
    for i, cost in enumerate(costs):
        if current and used + cost > budget:
            batches.append(current)
            current, used = [], 0
        current.append(i)
        used += cost
    if current:
        batches.append(current)
    return batches


class BatchScorer:
    """Scores lists of items with one judge: ``score(items) -> list[ItemResult]``.

    ``spec`` sets the method, the scale, k and the sampling (its ``seed`` and ``batch_size`` are
    not used: each item has its own seed, and the token budget sizes the batches).
    """

    def __init__(self, model, processor, spec: ScoringSpec, token_budget: int = DEFAULT_TOKEN_BUDGET) -> None:
        if token_budget < 1:
            raise ValueError(f"token_budget must be ≥ 1 (got {token_budget})")
        self.model, self.processor = model, processor
        self.spec = replace(spec, seed_per_request=True)
        self.token_budget = token_budget
        self.batches_run = 0  # batched rollouts so far (the server reports it)

    @classmethod
    def load(cls, model, token_budget: int = DEFAULT_TOKEN_BUDGET, **kwargs) -> BatchScorer:
        """A judge from a checkpoint folder or hub id: ``kwargs`` as ``eval.rank.PreferenceScorer``
        (method, k, scale, max_new_tokens, temperature, dtype, device, max_pixels), with the same
        defaults: the checkpoint's own method and rating scale."""
        scorer = PreferenceScorer(model, **kwargs)
        return cls(scorer.model, scorer.processor, scorer.spec, token_budget)

    @property
    def method(self) -> str:
        return self.spec.method

    def soft_scores(self, items: list[Item]) -> list[list[float]]:
        """Each item's Mean@k soft scores (the ``eval.adapters`` judge interface)."""
        return [r.soft for r in self.score(items)]

    def plan(self, items: list[Item]) -> tuple[list[GroupResult], list[tuple[GroupResult, int, Request]]]:
        """Each item's ``GroupResult`` (to be filled) and all requests, in item order."""
        results, pending = [], []
        for item in items:
            if not item.images:
                raise ValueError("an item needs at least one image")
            spec = replace(self.spec, seed=item.seed)
            anchor, plan = plan_group(spec, len(item.images), item.prompt)
            result = GroupResult(item.prompt, item.prompt, len(item.images), anchor, plan, [None] * len(plan))
            results.append(result)
            for i, idx in enumerate(plan):
                request = Request(spec.task, item.prompt, [item.images[j] for j in idx],
                                  request_seed(item.seed, item.prompt, i))  # fmt: skip
                pending.append((result, i, request))
        return results, pending

    def score(self, items: list[Item]) -> list[ItemResult]:
        """Score every item; results in input order."""
        results, pending = self.plan(items)
        costs = [request_tokens(self.processor, self.spec, r) for _, _, r in pending]
        share = self.spec.share_anchor and self.spec.method == "anchor"
        for batch in pack(costs, self.token_budget):
            requests = [pending[i][2] for i in batch]
            judgements = judge(self.model, self.processor, requests, self.spec.rating_values, self.spec.k,
                               self.spec.sampling, share_first_image=share)  # fmt: skip
            self.batches_run += 1
            for i, j in zip(batch, judgements):
                result, index, _ = pending[i]
                result.judgements[index] = j
        return [self.finish(r) for r in results]

    def finish(self, result: GroupResult) -> ItemResult:
        """An item's image scores from its answered requests."""
        spec, k = self.spec, self.spec.k
        parsed = [True] * result.n_images
        for idx, j in zip(result.requests, result.judgements):
            for i in idx:
                parsed[i] = parsed[i] and all(j.well_formed)
        requests = [{"images": list(idx), "texts": j.texts, "soft": j.soft, "hard": j.hard,
                     "parsed": j.well_formed} for idx, j in zip(result.requests, result.judgements)]  # fmt: skip
        return ItemResult(
            soft=image_scores(spec, result, "soft", k),
            hard=image_scores(spec, result, "hard", k),
            parsed=parsed,
            reasoning=image_reasoning(result, spec),
            anchor=result.anchor,
            requests=requests,
        )
