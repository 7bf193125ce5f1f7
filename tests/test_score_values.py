"""Soft scores checked for their value, not only their order and range: the pair score p(1), the
``PreferenceScorer`` reward and the evaluation report, each against a plain forward pass over the
prompt, the images in the order the method promises and the rollout's own text."""

from __future__ import annotations

import json

import pytest
import torch
from conftest import solid
from test_soft_head import _completion_batch

from data.prompts import messages_for
from eval.pairwise import choose_anchor
from eval.rank import PreferenceScorer
from eval.score import Request, encode_requests, score_completions
from models.qwen_vl import build_inputs, render_prompt, repeat_inputs, token_ids
from models.soft_head import fallback_text

SCALE = (1, 2, 3, 4, 5, 6, 7)
PROMPT = "a red circle on a white background"

pytestmark = pytest.mark.usefixtures("one_thread")


@torch.no_grad()
def plain_answer_distribution(model, processor, task, prompt, images, prefix, values) -> torch.Tensor:
    """p over the answers ``values`` after ``prefix`` (completion text up to and with ``<answer>``):
    one example, one ordinary forward over the whole text, the last position's logits. (K,)"""
    scale = values if task == "rating" else ()
    text = render_prompt(processor, messages_for(task, prompt, len(images), scale))
    inputs = build_inputs(processor, [text], [images])
    prefix_ids = torch.tensor([processor.tokenizer.encode(prefix, add_special_tokens=False)])
    logits_V = model(
        input_ids=torch.cat([inputs["input_ids"], prefix_ids], dim=1),
        attention_mask=torch.ones(1, inputs["input_ids"].shape[1] + prefix_ids.shape[1], dtype=torch.long),
        mm_token_type_ids=torch.cat([inputs["mm_token_type_ids"], torch.zeros_like(prefix_ids)], dim=1),
        pixel_values=inputs["pixel_values"],
        image_grid_thw=inputs["image_grid_thw"],
    ).logits[0, -1]
    f_K = logits_V[token_ids(processor, [str(v) for v in values])].float()
    return torch.exp(f_K) / torch.exp(f_K).sum()  # softmax over the valid answers only


def plain_soft_score(model, processor, task, prompt, images, rollout_text, values) -> float:
    """E[answer] of a rollout the model did not finish: read after ``fallback_text`` (the random
    tiny model writes no well-formed answer in 8 tokens, so every rollout takes this path)."""
    p = plain_answer_distribution(model, processor, task, prompt, images, fallback_text(rollout_text), values)
    return float((p * torch.tensor(values, dtype=torch.float32)).sum())


def test_pair_soft_score_is_p1_of_a_plain_forward(tiny):
    """p(1 | C) = e^{f(1)} / (e^{f(0)} + e^{f(1)}), read where the completion put its answer; the
    second image is the one ``1`` prefers. Mutation checked by hand: swapping the answer tokens
    (the pipeline then reads p(0)) fails it."""
    model, processor = tiny
    pairs = [[solid("red"), solid("blue", 100)], [solid("green", 84), solid("yellow")]]
    requests = [Request("pair", p, ims) for p, ims in zip(("a red circle", "a cat"), pairs)]
    inputs = encode_requests(processor, requests, ())
    G = 2
    texts = [
        "<think>the left</think><answer>1</answer>",
        "<think>equal</think><answer>0</answer>",
        "<think>a cat</think><answer>2</answer>",  # not a pair answer: read after the fallback prefix
        "<think>never closed",
    ]
    ids, mask = _completion_batch(processor, texts)
    soft, _, _, fallback, _ = score_completions(model, processor, repeat_inputs(inputs, G), ids, mask, texts,
                                             "pair", (0, 1))  # fmt: skip
    assert fallback == [False, False, True, True]
    prefixes = [t.split("<answer>")[0] + "<answer>" for t in texts[:2]] + [
        fallback_text(t) for t in texts[2:]
    ]
    expected = []
    for n, prefix in enumerate(prefixes):
        p0, p1 = plain_answer_distribution(model, processor, "pair", requests[n // G].prompt, pairs[n // G],
                                           prefix, (0, 1))  # fmt: skip
        expected.append(p1)
        torch.testing.assert_close(p0 + p1, torch.tensor(1.0))
    torch.testing.assert_close(torch.tensor(soft), torch.stack(expected), atol=1e-5, rtol=0)
    assert max(abs(p - 0.5) for p in soft) > 1e-3, "scores of exactly 0.5 would not tell p(1) from p(0)"


@pytest.mark.parametrize("method", ["rating", "anchor"])
def test_preference_scorer_rewards_are_the_plain_forward_values(tiny, method):
    """``score(prompt, images)[i]`` is Mean@2 of E[r | C] over image i's two rollouts (rating), or
    p(i ≻ anchor) from comparisons that show [anchor, i] in that order (anchor; the anchor 0.5).

    Mutations checked by hand, each fails it: the requests showing their images in reverse
    order ([i, anchor]); the per-image scores negated; the anchor score read as P(anchor ≻ i)."""
    model, processor = tiny
    images = [solid("red"), solid("blue", 90), solid("green", 72)]
    scorer = PreferenceScorer((model, processor), method=method, k=2, max_new_tokens=8, seed=0)
    result = scorer.judge(PROMPT, images)
    rewards = scorer.score(PROMPT, images)
    assert rewards == result.scores["soft@2"]
    assert all(all(j.fallback) for j in result.judgements), "precondition: every rollout takes the fallback"

    expected = []
    if method == "rating":
        for i, image in enumerate(images):
            (judgement,) = [j for idx, j in zip(result.requests, result.judgements) if idx == (i,)]
            per_rollout = [plain_soft_score(model, processor, "rating", PROMPT, [image], t, SCALE)
                           for t in judgement.texts]  # fmt: skip
            expected.append(sum(per_rollout) / 2)
    else:
        anchor = choose_anchor(len(images), 0, PROMPT)  # rank.py draws the anchor with the prompt as group id
        assert result.anchor == anchor
        for i, image in enumerate(images):
            if i == anchor:
                expected.append(0.5)
                continue
            (judgement,) = [
                j for idx, j in zip(result.requests, result.judgements) if set(idx) == {anchor, i}
            ]
            per_rollout = [plain_soft_score(model, processor, "pair", PROMPT, [images[anchor], image], t, (0, 1))
                           for t in judgement.texts]  # fmt: skip
            expected.append(sum(per_rollout) / 2)
    torch.testing.assert_close(torch.tensor(rewards), torch.tensor(expected), atol=1e-5, rtol=0)


def _ranks_from(scores: list[float]) -> tuple[float, ...]:
    """Human rank levels that agree with ``scores``: 1 for the highest, ties share a level."""
    return tuple(1.0 + sum(other > s for other in scores) for s in scores)


@pytest.mark.parametrize("kind", ["imagereward", "hpdv2"])
def test_evaluation_report_accuracy_has_the_right_direction(tiny, tmp_path, kind):
    """Two evaluations with the same seed draw the same rollouts. The first one's predictions are
    checked against plain forward passes; the second gives the images human ranks that agree
    with those values, so its soft accuracy must be exactly 1 under every protocol.

    Mutations checked by hand, each fails it: the scores negated where the report computes its
    accuracies (accuracy 1 − true), or where the per-image scores are formed; the anchor's
    comparisons showing [i, anchor]; the anchor score read as P(anchor ≻ i)."""
    from common.config import EvalConfig
    from data.synthetic import write_hpdv2, write_imagereward
    from data.types import EvalGroup
    from eval.evaluate import evaluate

    model, processor = tiny
    if kind == "imagereward":
        from data.imagereward import read_eval

        write_imagereward(tmp_path / "data", prompts=8, seed=0)
        groups, scale = read_eval(tmp_path / "data", split="test").groups[:2], SCALE
    else:
        from data.hpdv2 import read_eval

        write_hpdv2(tmp_path / "data", prompts=8, seed=0)
        groups, scale = read_eval(tmp_path / "data").groups[:2], None
    cfg = EvalConfig(k=1, batch_size=8, seed=0)
    evaluate(model, processor, groups, kind, scale, cfg, max_new_tokens=8, out_dir=tmp_path / "first",
             progress=False)  # fmt: skip
    rows = [json.loads(line) for line in (tmp_path / "first" / "predictions.jsonl").read_text().splitlines()]

    agreeing = []
    for group, row in zip(groups, rows):
        images = [ref.load() for ref in group.images]
        values = []
        for i in range(len(images)):
            if kind == "imagereward":
                (request,) = [q for q in row["requests"] if q["images"] == [i]]
                shown, task, answers = [images[i]], "rating", SCALE
            elif i == row["anchor"]:
                values.append(0.5)
                continue
            else:
                (request,) = [q for q in row["requests"] if q["images"] == [row["anchor"], i]]
                shown, task, answers = [images[row["anchor"]], images[i]], "pair", (0, 1)
            values.append(
                plain_soft_score(model, processor, task, group.prompt, shown, request["texts"][0], answers)
            )
        torch.testing.assert_close(
            torch.tensor(row["scores"]["soft@1"]), torch.tensor(values), atol=1e-5, rtol=0
        )
        agreeing.append(EvalGroup(group.group_id, group.prompt, group.images, _ranks_from(values)))

    report = evaluate(model, processor, agreeing, kind, scale, cfg, max_new_tokens=8, progress=False)
    assert report["metrics"]["soft@1"] == {
        "imagereward_accuracy": 1.0,
        "hpsv2_accuracy": 1.0,
        "pairwise_accuracy": 1.0,
    }
