"""The trainer-facing call shapes (eval/adapters.py): every image form gives the same rewards, and
those equal the batched scorer's."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from eval.adapters import FlowGRPOReward, GroupwiseReward, PointwiseReward, as_pil_images
from eval.batch import BatchScorer, Item
from eval.score import ScoringSpec

pytestmark = pytest.mark.usefixtures("one_thread")

SCALE = (1, 2, 3, 4, 5, 6, 7)
COLOURS = ("red", "green", "blue", "yellow")
PROMPTS = ["a red apple", "a green leaf", "a red apple", "a blue sky"]


def judge(tiny, method: str) -> BatchScorer:
    return BatchScorer(*tiny, ScoringSpec(method, SCALE if method == "rating" else (), 1, 8))


def image_forms():
    """The same four 32×48 images as a float NCHW tensor, a uint8 NHWC array and a list of PIL images."""
    rng = np.random.default_rng(0)
    arr = rng.integers(0, 256, size=(4, 32, 48, 3), dtype=np.uint8)  # (B, H, W, 3)
    floats = torch.from_numpy(arr).permute(0, 3, 1, 2).float() / 255  # (B, 3, H, W) in [0, 1]
    return arr, floats, [Image.fromarray(a) for a in arr]


def test_the_three_image_forms_decode_to_the_same_pixels():
    arr, floats, pil = image_forms()
    for form in (arr, floats, pil, torch.from_numpy(arr), list(floats)):
        got = as_pil_images(form)
        assert [np.asarray(im).tolist() for im in got] == [a.tolist() for a in arr]


@pytest.mark.parametrize("bad", [torch.zeros(2, 4, 8, 8), np.zeros((2, 8, 8, 3), np.float32), "x.png", [1]])
def test_a_wrong_image_form_is_one_clear_error(bad):
    with pytest.raises(ValueError, match="image"):
        as_pil_images(bad)


def test_flow_grpo_reward_on_a_rating_judge(tiny):
    arr, floats, pil = image_forms()
    reward_fn = FlowGRPOReward(judge(tiny, "rating"))
    scores, info = reward_fn(floats, PROMPTS, {})
    assert scores.shape == (4,) and scores.dtype == np.float32 and info["groups"] == 4
    for form in (arr, pil):
        np.testing.assert_allclose(reward_fn(form, PROMPTS, {})[0], scores, atol=1e-5)
    # Each image is one item of its own: the batched scorer gives the same.
    alone = [judge(tiny, "rating").soft_scores([Item(p, [im])])[0][0] for p, im in zip(PROMPTS, pil)]
    np.testing.assert_allclose(scores, alone, atol=1e-5)
    # Flow-Factory's pointwise shape: the same rewards.
    out = PointwiseReward(judge(tiny, "rating"))(prompt=PROMPTS, image=pil)
    torch.testing.assert_close(out.rewards, torch.from_numpy(scores), rtol=0, atol=1e-5)


def test_flow_grpo_reward_on_a_pair_judge_ranks_each_prompts_images(tiny):
    _, _, pil = image_forms()
    scores, info = FlowGRPOReward(judge(tiny, "anchor"))(pil, PROMPTS, {"seed": 2})
    assert info["groups"] == 3  # "a red apple" twice
    assert scores[3] == 0.5  # a prompt with one image: the anchor alone
    (group,) = judge(tiny, "anchor").soft_scores([Item("a red apple", [pil[0], pil[2]], seed=2)])
    np.testing.assert_allclose(scores[[0, 2]], group, atol=1e-5)
    assert 0.5 in group  # one of the two is the anchor
    out = GroupwiseReward(judge(tiny, "anchor"), seed=2)(prompt=["a red apple"] * 2, image=[pil[0], pil[2]])
    torch.testing.assert_close(out.rewards, torch.tensor(group, dtype=torch.float32), rtol=0, atol=1e-5)
    with pytest.raises(ValueError, match="no pointwise score"):
        PointwiseReward(judge(tiny, "anchor"))
    with pytest.raises(ValueError, match="one prompt"):
        GroupwiseReward(judge(tiny, "anchor"))(prompt=PROMPTS[:2], image=pil[:2])
