"""Rewards on a table of tricky completions, and the weighted per-task sum."""

import pytest
import torch
from torch.testing import assert_close

from grpo.rewards import (
    REWARD_FNS,
    TASK_REWARDS,
    approx_match_reward,
    compute_rewards,
    exact_match_reward,
    format_reward,
)

SCALE = tuple(range(1, 8))  # a 1…7 rating scale
TARGET = 5

# (completion, format, exact, approx) for target 5 on the 1…7 scale
TABLE = [
    ("<think>looks fine</think><answer>5</answer>", 1.0, 1.0, 1.0),
    ("<think>ok</think><answer>4</answer>", 1.0, 0.0, 0.75),  # |4 − 5| = 1
    ("<think>ok</think><answer>7</answer>", 1.0, 0.0, 0.5),  # |7 − 5| = 2
    ("<think>ok</think><answer>2</answer>", 1.0, 0.0, 0.0),  # |2 − 5| = 3
    ("<think>ok</think><answer>1</answer>", 1.0, 0.0, 0.0),  # |1 − 5| = 4
    (
        "  \n<think>\nline one\nline two\n</think>\n\n<answer> 5 </answer>\n",
        1.0,
        1.0,
        1.0,
    ),  # white space is fine
    ("<answer>5</answer>", 0.0, 0.0, 0.0),  # missing think
    ("<think>ok</think>5", 0.0, 0.0, 0.0),  # missing answer tags
    ("<think>ok</think><answer>5", 0.0, 0.0, 0.0),  # unclosed answer
    ("<think>ok<answer>5</answer>", 0.0, 0.0, 0.0),  # unclosed think
    ("<think>ok</think><answer>5</answer><answer>5</answer>", 0.0, 0.0, 0.0),  # two answers
    ("<think>a</think><think>b</think><answer>5</answer>", 0.0, 0.0, 0.0),  # two think blocks
    ("<think>ok</think><answer></answer>", 0.0, 0.0, 0.0),  # empty answer
    ("<think>ok</think><answer>   </answer>", 0.0, 0.0, 0.0),  # blank answer
    ("<think>ok</think><answer>5 5</answer>", 0.0, 0.0, 0.0),  # two numbers
    ("<think>ok</think><answer>8</answer>", 0.0, 0.0, 0.0),  # out of range (above)
    ("<think>ok</think><answer>0</answer>", 0.0, 0.0, 0.0),  # out of range (below)
    ("<think>ok</think><answer>five</answer>", 0.0, 0.0, 0.0),  # not a digit
    ("<think>ok</think><answer>7.0</answer>", 0.0, 0.0, 0.0),  # not an integer literal
    ("<think>ok</think><answer>5.0</answer>", 0.0, 0.0, 0.0),  # right value, wrong form
    ("<think>ok</think><answer>-5</answer>", 0.0, 0.0, 0.0),  # negative
    ("<think>ok</think><answer>rating: 5</answer>", 0.0, 0.0, 0.0),  # words around the number
    ("<think>ok</think><answer>5</answer> I hope that helps", 0.0, 0.0, 0.0),  # text after the answer
    ("Sure! <think>ok</think><answer>5</answer>", 0.0, 0.0, 0.0),  # text before think
    ("<think>a <think>b</think> c</think><answer>5</answer>", 0.0, 0.0, 0.0),  # nested think
    ("<think>a <answer>5</answer></think><answer>5</answer>", 0.0, 0.0, 0.0),  # answer nested in think
    ("<answer>5</answer><think>ok</think>", 0.0, 0.0, 0.0),  # answer before think
    ("<THINK>ok</THINK><answer>5</answer>", 0.0, 0.0, 0.0),  # tags are case-sensitive
    ("", 0.0, 0.0, 0.0),  # empty completion
]


@pytest.mark.parametrize(("text", "fmt", "exact", "approx"), TABLE)
def test_reward_table(text, fmt, exact, approx):
    assert format_reward(text, SCALE) == fmt
    assert exact_match_reward(text, TARGET, SCALE) == exact
    assert approx_match_reward(text, TARGET, valid_answers=SCALE) == approx


def test_contract_signatures_default_to_digits():
    # the public contract: format_reward(text), exact_match_reward(text, target), approx_match_reward(text, target)
    assert format_reward("<think>x</think><answer>9</answer>") == 1.0
    assert format_reward("<think>x</think><answer>10</answer>") == 0.0  # 10 is not a digit 0–9
    assert exact_match_reward("<think>x</think><answer>0</answer>", 0) == 1.0
    assert approx_match_reward("<think>x</think><answer>3</answer>", 1) == 0.5  # |3 − 1| = 2


def test_pair_task_answers():
    assert exact_match_reward("<think>b</think><answer>1</answer>", 1, (0, 1)) == 1.0
    assert exact_match_reward("<think>b</think><answer>0</answer>", 1, (0, 1)) == 0.0
    assert format_reward("<think>b</think><answer>2</answer>", (0, 1)) == 0.0


def test_target_outside_the_scale_is_an_error():
    with pytest.raises(ValueError, match="target 9"):
        exact_match_reward("<think>x</think><answer>5</answer>", 9, SCALE)
    with pytest.raises(ValueError, match="target 0"):
        approx_match_reward("<think>x</think><answer>5</answer>", 0, SCALE)


def test_task_components():
    assert TASK_REWARDS == {"rating": ("format", "exact", "approx"), "pair": ("format", "exact")}
    assert set(REWARD_FNS) == {"format", "exact", "approx"}


def test_compute_rewards_rating_default_weights():
    texts = [row[0] for row in TABLE[:4]] + ["<answer>5</answer>"]
    # format  (1, 1, 1, 1, 0); exact (1, 0, 0, 0, 0); approx (1, .75, .5, 0, 0)
    # total = sum = (3, 1.75, 1.5, 1, 0)
    total, parts = compute_rewards(texts, [5] * 5, "rating", SCALE)
    assert list(parts) == ["format", "exact", "approx"]
    assert_close(parts["format"], torch.tensor([1.0, 1.0, 1.0, 1.0, 0.0]))
    assert_close(parts["exact"], torch.tensor([1.0, 0.0, 0.0, 0.0, 0.0]))
    assert_close(parts["approx"], torch.tensor([1.0, 0.75, 0.5, 0.0, 0.0]))
    assert_close(total, torch.tensor([3.0, 1.75, 1.5, 1.0, 0.0]))


def test_compute_rewards_weights():
    texts = ["<think>a</think><answer>4</answer>", "<think>a</think><answer>6</answer>"]
    # targets 4 and 3: format (1, 1), exact (1, 0), approx (1, 0)  [|6 − 3| = 3]
    # weights format 0.5, exact 2, approx 1 (default): total = (0.5 + 2 + 1, 0.5) = (3.5, 0.5)
    total, parts = compute_rewards(texts, [4, 3], "rating", SCALE, {"format": 0.5, "exact": 2.0})
    assert_close(total, torch.tensor([3.5, 0.5]))
    assert_close(parts["format"], torch.tensor([1.0, 1.0]))  # components stay unweighted


def test_compute_rewards_pair():
    texts = ["<think>b</think><answer>1</answer>", "<think>b</think><answer>0</answer>", "<answer>1</answer>"]
    total, parts = compute_rewards(texts, [1, 1, 1], "pair", (0, 1))
    assert list(parts) == ["format", "exact"]
    assert_close(total, torch.tensor([2.0, 1.0, 0.0]))


def test_compute_rewards_errors():
    with pytest.raises(ValueError, match="not components"):
        compute_rewards(["x"], [1], "rating", SCALE, {"fromat": 1.0})
    with pytest.raises(ValueError, match="not components"):
        compute_rewards(["x"], [1], "pair", (0, 1), {"approx": 1.0})  # approx is not a pair reward
    with pytest.raises(ValueError, match="unknown task"):
        compute_rewards(["x"], [1], "ranking", SCALE)
    with pytest.raises(ValueError, match="2 completions but 1 targets"):
        compute_rewards(["x", "y"], [1], "rating", SCALE)
