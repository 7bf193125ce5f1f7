"""Shared anchor prefix: the instructions + anchor image prefilled once per group.

``sample_shared_first_image`` must be the same computation as prefilling every comparison in
full: with the same seed the same tokens as ``generate`` (images of different sizes, so the
suffixes after the anchor differ in length and are padded), the same anchor scores from
``score_groups``, and the anchor image through the vision tower once.
"""

from __future__ import annotations

import pytest
import torch
from conftest import biased_towards_eos, solid

from eval.score import Request, ScoringSpec, encode_requests, score_groups, seeded
from models.sampling import draw_tokens_as_generate, sample_completions, sample_shared_first_image

pytestmark = pytest.mark.usefixtures("one_thread")


def _images():
    # 4, 16, 4, 9 and 25 image tokens after merging: suffixes after the anchor differ in length.
    return [solid("red"), solid("blue", 112), solid("green", 56), solid("yellow", 84), solid("white", 140)]


def _requests():
    """Two prompts' anchor comparisons in one batch, plus a swapped one (its own prefix)."""
    im = _images()
    return (
        [Request("pair", "a red circle", [im[0], im[j]]) for j in (1, 2, 3)]
        + [Request("pair", "a yellow dog", [im[3], im[j]]) for j in (4, 0)]
        + [Request("pair", "a yellow dog", [im[4], im[3]])]  # debias: [j, anchor]
    )


@pytest.fixture(scope="module")
def eos_prone(tiny):
    """The tiny model biased towards end-of-turn, so completions end at varied lengths."""
    model, processor = tiny
    return biased_towards_eos(model, processor, 3.0), processor


@pytest.mark.parametrize("G", [1, 3])
def test_shared_first_image_draws_what_generate_draws(eos_prone, G):
    model, processor = eos_prone
    inputs = encode_requests(processor, _requests(), ())
    torch.manual_seed(11)
    ours, ours_logits = sample_shared_first_image(model, processor, inputs, G, 20, return_scores=True,
                                                  draw=draw_tokens_as_generate)  # fmt: skip
    torch.manual_seed(11)
    theirs, their_logits = sample_completions(
        model, processor, inputs, G, 20, return_scores=True, share_prefix=False
    )
    lengths = ours.mask_NT.sum(dim=1)
    assert lengths.min() < lengths.max(), "the eos bias must end completions at varied lengths"
    assert torch.equal(ours.ids_NT, theirs.ids_NT) and torch.equal(ours.mask_NT, theirs.mask_NT)
    assert ours.texts == theirs.texts and torch.equal(ours.truncated_N, theirs.truncated_N)
    real = ours.mask_NT.bool()
    torch.testing.assert_close(ours_logits[real], their_logits[real], atol=1e-5, rtol=0)


def test_anchor_image_goes_through_the_vision_tower_once(tiny):
    model, processor = tiny
    requests = _requests()
    inputs = encode_requests(processor, requests, ())
    calls = []  # patch rows per vision-tower call
    hook = model.model.visual.register_forward_pre_hook(lambda module, args: calls.append(args[0].shape[0]))
    try:
        sample_shared_first_image(model, processor, inputs, 2, 4)
        shared = list(calls)
        calls.clear()
        sample_completions(model, processor, inputs, 2, 4, share_prefix=False)
        plain = list(calls)
    finally:
        hook.remove()

    def patches(image):  # (h/14)·(w/14) patch rows of one image
        return int(
            encode_requests(processor, [Request("pair", "x", [image, image])], ())["image_grid_thw"][0].prod()
        )

    # Prefixes: anchor red (prompt 1), anchor yellow (prompt 2), white (the swapped request);
    # suffixes: every request's second image.
    prefixes = (
        patches(requests[0].images[0]) + patches(requests[3].images[0]) + patches(requests[5].images[0])
    )
    suffixes = sum(patches(r.images[1]) for r in requests)
    assert shared == [prefixes, suffixes]
    assert plain == [sum(patches(im) for r in requests for im in r.images)]  # anchors 3× and 2×
    assert sum(shared) < sum(plain)


@pytest.mark.parametrize("debias", [False, True])
def test_anchor_scores_equal_the_unshared_path(tiny, debias):
    # 5 + 4 images, batches of 3 requests: batches mix the two groups and split them.
    model, processor = tiny
    im = _images()
    groups = [("g0", "a red circle", im), ("g1", "a yellow dog", im[1:])]

    def run(share):
        spec = ScoringSpec("anchor", k=2, max_new_tokens=12, batch_size=3, seed=1, debias=debias,
                           share_anchor=share)  # fmt: skip
        with seeded(0):
            return list(score_groups(model, processor, groups, spec))

    shared, plain = run(True), run(False)
    for s, p in zip(shared, plain):
        assert s.anchor == p.anchor and s.requests == p.requests
        assert [j.texts for j in s.judgements] == [j.texts for j in p.judgements]
        for js, jp in zip(s.judgements, p.judgements):
            assert torch.equal(js.ids_kT, jp.ids_kT)
            torch.testing.assert_close(torch.tensor(js.soft), torch.tensor(jp.soft), atol=1e-6, rtol=0)
        assert s.scores == p.scores  # same completions, same scoring batches: bit for bit
