"""Batched scoring across prompts (eval/batch.py): per-item results equal one-at-a-time scoring,
whatever the batch, its order and its token budget."""

from __future__ import annotations

import shutil

import pytest
import torch
from conftest import solid

from common.manifest import write_task
from eval.batch import BatchScorer, Item, pack
from eval.rank import PreferenceScorer
from eval.score import Request, ScoringSpec, judge

pytestmark = pytest.mark.usefixtures("one_thread")

SCALE = (1, 2, 3, 4, 5, 6, 7)
NEW = 8


def items() -> list[Item]:
    """Mixed prompts, image sizes (so padding differs from batch to batch) and group sizes."""
    return [
        Item("a red circle", [solid("red", 64)]),
        Item("two blue squares on grass", [solid("blue", 96), solid("green", 64)], seed=3),
        Item("a yellow sun", [solid("yellow", 64), solid("orange", 80), solid("purple", 64)]),
        Item("a red circle", [solid("red", 64)], seed=1),  # same prompt and image, another seed
    ]


def spec(method: str, k: int = 2) -> ScoringSpec:
    return ScoringSpec(method, SCALE if method == "rating" else (), k, NEW)


@pytest.mark.parametrize("method", ["rating", "anchor"])
def test_an_item_scores_as_preference_scorer_does_alone(tiny, method):
    """The contract behind ``/v1/score``: an item's soft scores are the ones ``eval.rank``
    (``PreferenceScorer`` with the item's seed) gives that prompt and those images alone."""
    got = BatchScorer(*tiny, spec(method)).score(items())
    for item, result in zip(items(), got):
        alone = PreferenceScorer(tiny, method, k=2, scale=SCALE, max_new_tokens=NEW, seed=item.seed)
        want = alone.judge(item.prompt, item.images)
        torch.testing.assert_close(result.soft, want.scores["soft@2"], rtol=0, atol=1e-5)
        assert result.hard == want.scores["hard@2"]
        assert [q["texts"] for q in result.requests] == [j.texts for j in want.judgements]
        assert result.anchor == want.anchor
        assert len(result.parsed) == len(result.reasoning) == len(item.images)
    if method == "rating":  # the seed is the item's own: same prompt and image, seeds 0 and 1, other rollouts
        assert got[0].requests[0]["texts"] != got[3].requests[0]["texts"]
    else:  # one image under the anchor method: the anchor alone, no comparison
        assert got[0].soft == [0.5] and got[0].requests == []


def test_order_and_budget_do_not_change_an_item(tiny):
    """Reversed order, and a budget that puts every request in a batch of its own, give each item
    the same texts and (to float rounding) the same scores."""
    base = BatchScorer(*tiny, spec("rating")).score(items())
    reversed_ = BatchScorer(*tiny, spec("rating")).score(items()[::-1])[::-1]
    one_each = BatchScorer(*tiny, spec("rating"), token_budget=1)
    alone = one_each.score(items())
    assert one_each.batches_run == 7  # 1 + 2 + 3 + 1 requests, one batch each
    for a, b, c in zip(base, reversed_, alone):
        assert [x["texts"] for x in a.requests] == [x["texts"] for x in b.requests]
        assert [x["texts"] for x in a.requests] == [x["texts"] for x in c.requests]
        torch.testing.assert_close(a.soft, b.soft, rtol=0, atol=1e-5)
        torch.testing.assert_close(a.soft, c.soft, rtol=0, atol=1e-5)


def test_one_batch_for_all_items_within_the_budget(tiny):
    scorer = BatchScorer(*tiny, spec("rating"))
    scorer.score(items())
    assert scorer.batches_run == 1


def test_pack_respects_the_budget():
    assert pack([5, 5, 5, 5], 10) == [[0, 1], [2, 3]]
    assert pack([5, 20, 5], 10) == [[0], [1], [2]]  # one request over the budget runs alone
    assert pack([], 10) == []


def test_per_request_seeds_need_every_request_seeded(tiny):
    requests = [Request("rating", "a", [solid("red")], seed=1), Request("rating", "b", [solid("blue")])]
    with pytest.raises(ValueError, match="per-request seeds"):
        judge(*tiny, requests, SCALE, 1, spec("rating").sampling)


def test_the_default_method_follows_the_checkpoint(tiny_dir, tmp_path):
    """A checkpoint trained on pairs ranks by anchor; one trained on ratings, or without a record, rates."""
    model = tmp_path / "model"
    shutil.copytree(tiny_dir, model)
    assert PreferenceScorer(str(model)).spec.method == "rating"
    write_task(model, "pair", None)
    assert PreferenceScorer(str(model)).spec.method == "anchor"
    assert BatchScorer.load(str(model), max_new_tokens=NEW).method == "anchor"


def test_batched_equals_alone_with_the_real_tokenizer_and_vocabulary(like):
    """The configuration that ships: the real Qwen2.5-VL-7B files (152,064-token vocabulary, real
    chat template and processor), a rating item and an anchor-ranked group."""
    for method, item in (("rating", Item("a red circle", [solid("red", 56)], seed=2)),
                         ("anchor", Item("two cats", [solid("blue", 56), solid("green", 84), solid("red", 56)])),):  # fmt: skip
        (got,) = BatchScorer(*like, spec(method, k=1)).score(
            [Item("another prompt", [solid("white", 56)]), item]
        )[1:]
        want = PreferenceScorer(like, method, k=1, scale=SCALE, max_new_tokens=NEW, seed=item.seed)
        result = want.judge(item.prompt, item.images)
        torch.testing.assert_close(got.soft, result.scores["soft@1"], rtol=0, atol=1e-5)
        assert [q["texts"] for q in got.requests] == [j.texts for j in result.judgements]
