"""The soft head: expectations over answer tokens, answer positions, and the fallback."""

from __future__ import annotations

import math

import torch
from conftest import solid

from data.prompts import messages_for
from models.qwen_vl import build_inputs, render_prompt, repeat_inputs, token_ids
from models.soft_head import (
    answer_choice,
    answer_token_index,
    expected_rating,
    fallback_text,
    pair_probability,
    soft_scores,
)

SCALE = (1, 2, 3, 4, 5, 6, 7)


def test_expected_rating_by_hand():
    # logits [0, ln 3] over ratings {1, 2} → p = [1/4, 3/4] → E = 1·0.25 + 2·0.75 = 1.75
    logits = torch.tensor([0.0, 9.0, math.log(3.0), -5.0])  # tokens 1 and 3 hold ratings 1 and 2
    torch.testing.assert_close(expected_rating(logits, [0, 2], [1, 2]), torch.tensor(1.75))
    # batched (..., V): a second row with equal logits → E = (1 + 2) / 2
    batch = torch.stack([logits, torch.zeros(4)])
    torch.testing.assert_close(expected_rating(batch, [0, 2], [1, 2]), torch.tensor([1.75, 1.5]))


def test_pair_probability_by_hand():
    # f(0) = 0, f(1) = ln 3 → p(1) = 3 / (1 + 3) = 0.75
    logits = torch.tensor([[0.0, math.log(3.0), 7.0]])
    torch.testing.assert_close(pair_probability(logits, 0, 1), torch.tensor([0.75]))
    torch.testing.assert_close(pair_probability(logits, 0, 1), expected_rating(logits, [0, 1], [0, 1]))


def test_answer_choice_by_hand():
    # the argmax of the answer logits, as the answer value; a tie takes the first
    logits = torch.tensor([[0.0, 2.0, 1.0], [3.0, -1.0, 3.0]])
    assert answer_choice(logits, (1, 2, 3)).tolist() == [2.0, 1.0]
    assert answer_choice(torch.tensor([[0.2, 0.1], [0.1, 0.2]]), (0, 1)).tolist() == [0.0, 1.0]


def test_answer_token_index():
    pieces = ["<think", ">", "ok", "</", "think", "><", "answer", ">", "5", "</", "answer", ">"]
    assert answer_token_index(pieces, 5) == 8
    assert answer_token_index(pieces[:8] + [" ", "5", "</answer>"], 5) == 9  # blank tokens are skipped
    assert answer_token_index(pieces[:7] + [">5", "</answer>"], 5) is None  # tag and digit share a token
    assert answer_token_index(pieces[:8] + ["6"], 5) is None


def test_fallback_text():
    assert fallback_text("<think>hm</think> blah") == "<think>hm</think><answer>"
    assert fallback_text("<think>never closed") == "<think>never closed</think><answer>"
    assert fallback_text("<think>x<answer>4") == "<think>x</think><answer>"


def _completion_batch(processor, texts):
    tok = processor.tokenizer
    rows = [
        tok.encode(t, add_special_tokens=False) + [tok.convert_tokens_to_ids("<|im_end|>")] for t in texts
    ]
    T = max(map(len, rows))
    ids = torch.full((len(rows), T), tok.pad_token_id)
    mask = torch.zeros((len(rows), T), dtype=torch.long)
    for n, r in enumerate(rows):
        ids[n, : len(r)], mask[n, : len(r)] = torch.tensor(r), 1
    return ids, mask


def _slow_score(model, processor, prompt_text, image, prefix_text):
    """Reference: one example, a plain forward over prompt + prefix, the last position's logits."""
    inputs = build_inputs(processor, [prompt_text + prefix_text], [[image]])
    logits = model(**inputs).logits[0, -1]
    return expected_rating(logits, token_ids(processor, [str(v) for v in SCALE]), SCALE)


def test_batched_soft_scores_equal_one_at_a_time_reference(tiny):
    model, processor = tiny
    images = [solid("red"), solid("blue", 100)]
    prompts = [
        render_prompt(processor, messages_for("rating", p, 1, SCALE)) for p in ("a red circle", "a cat")
    ]
    inputs = build_inputs(processor, prompts, [[im] for im in images])
    G = 3
    texts = [
        "<think>red circle</think><answer>5</answer>",
        "<think>bright</think><answer> 3 </answer>",
        "<think>never closed",  # no answer: the fallback appends </think><answer>
        "<think>a cat</think><answer>7</answer>",
        "<think>dark</think><answer>9</answer>",  # out of range: fallback
        "<think>ok</think><answer>2</answer>",
    ]
    ids, mask = _completion_batch(processor, texts)
    scores, fallback = soft_scores(model, processor, repeat_inputs(inputs, G), ids, mask, texts, SCALE)
    assert fallback.tolist() == [False, False, True, False, True, False]
    prefixes = [
        "<think>red circle</think><answer>",
        "<think>bright</think><answer> ",
        "<think>never closed</think><answer>",
        "<think>a cat</think><answer>",
        "<think>dark</think><answer>",
        "<think>ok</think><answer>",
    ]
    slow = torch.stack(
        [_slow_score(model, processor, prompts[n // G], images[n // G], prefixes[n]) for n in range(6)]
    )
    torch.testing.assert_close(scores, slow.detach(), atol=1e-5, rtol=0)
    assert ((scores >= 1) & (scores <= 7)).all()
