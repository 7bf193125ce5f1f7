"""Log-probs without (N, T, V) logits (issue 13): the chunked LM head + log-softmax against the
obvious full-vocabulary computation, on the tiny model and on a model of the real configuration
(V = 152,064); and prefix sharing under activation checkpointing against the unshared path."""

from __future__ import annotations

import pytest
import torch
from test_models import MIXED, ONE, TWO, _batch

import models.logprobs
from models.loading import load_policy, repeat_inputs
from models.logprobs import completion_logits, completion_logprobs, selective_log_softmax


def _completions(N: int, T: int, vocab: int, seed: int):
    """Random completion tokens, right padded to varied lengths (one row with a single token)."""
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, vocab, (N, T), generator=g)
    lengths = torch.randint(1, T + 1, (N,), generator=g)
    lengths[0], lengths[-1] = T, 1
    mask = (torch.arange(T) < lengths[:, None]).long()  # (N, T)
    return ids, mask, torch.randn(N, T, generator=g)


def _grads(model, logp, weight, mask) -> dict[str, torch.Tensor]:
    model.zero_grad(set_to_none=True)
    (logp * weight * mask).sum().backward()
    return {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


def _reference(model, inputs, ids, mask):
    """Today's computation: (N, T, V) float32 logits, then the log-softmax of the taken tokens."""
    return selective_log_softmax(completion_logits(model, inputs, ids, mask), ids)


def _assert_same(model, inputs, ids, mask, weight, prompt_rows=None, reference_inputs=None):
    real = mask.bool()
    expected = _reference(model, reference_inputs or inputs, ids, mask)
    expected_grads = _grads(model, expected, weight, mask)
    ours = completion_logprobs(model, inputs, ids, mask, prompt_rows=prompt_rows)
    torch.testing.assert_close(ours[real], expected[real], atol=1e-5, rtol=0)
    assert (ours[~real] == 0).all(), "padding positions are skipped"
    ours_grads = _grads(model, ours, weight, mask)
    assert set(ours_grads) == set(expected_grads) and "lm_head.weight" in ours_grads
    for name, g in expected_grads.items():
        torch.testing.assert_close(ours_grads[name], g, atol=1e-5, rtol=1e-4, msg=name)


@pytest.mark.parametrize("chunk_positions", [1, 7, 10_000], ids=["1", "7", "all"])
def test_chunked_logprobs_match_full_logits_tiny(tiny_dir, one_thread, monkeypatch, chunk_positions):
    model, processor = load_policy(str(tiny_dir))
    model.train()
    V = model.lm_head.out_features
    monkeypatch.setattr(models.logprobs, "LOGITS_CHUNK_BYTES", chunk_positions * 4 * V)
    inputs = repeat_inputs(_batch(processor, MIXED), 2)
    ids, mask, weight = _completions(6, 9, 800, seed=0)
    _assert_same(model, inputs, ids, mask, weight)


def test_chunked_logprobs_match_full_logits_real_vocabulary(like_dir, one_thread):
    # V = 152,064: the default chunk is 110 positions, so 4 × 40 = 160 positions span 2 chunks
    model, processor = load_policy(str(like_dir))
    model.train()
    assert model.lm_head.out_features == 152_064
    assert models.logprobs.LOGITS_CHUNK_BYTES // (4 * 152_064) == 110
    inputs = repeat_inputs(_batch(processor, ONE + TWO), 2)
    ids, mask, weight = _completions(4, 40, 151_000, seed=1)
    mask[:2] = 1  # ≥ 111 real positions: more than one chunk
    _assert_same(model, inputs, ids, mask, weight)


def test_no_vocabulary_sized_tensor_is_kept_for_the_backward(like_dir, one_thread):
    # The full path keeps (N, T, V) logits for the backward; the chunked path keeps no tensor with
    # a vocabulary dimension at all (each chunk's logits, and the head's weight, are recomputed /
    # re-read in the backward).
    model, processor = load_policy(str(like_dir))
    model.train()
    inputs = repeat_inputs(_batch(processor, ONE), 4)
    ids, mask, _ = _completions(4, 64, 151_000, seed=2)
    V = model.lm_head.out_features

    def saved_shapes(fn) -> list[tuple[int, ...]]:
        shapes = []

        def pack(t):
            shapes.append(tuple(t.shape))
            return t

        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            fn()
        return shapes

    full = saved_shapes(lambda: _reference(model, inputs, ids, mask))
    chunked = saved_shapes(lambda: completion_logprobs(model, inputs, ids, mask))
    assert (4, 64, V) in full
    assert not [s for s in chunked if V in s], "a vocabulary-sized tensor was kept for the backward"


def _count_rows_tokens(model):
    """(rows × tokens) seen by the first decoder layer, per forward call (hooks do not rerun on
    a checkpointed layer's replay: transformers checkpoints ``forward``, not ``__call__``)."""
    seen = []
    layer = model.model.language_model.layers[0]
    handle = layer.register_forward_pre_hook(lambda m, args: seen.append(args[0].shape[0] * args[0].shape[1]))
    return seen, handle


@pytest.mark.parametrize("examples", [MIXED, TWO + ONE], ids=["mixed-left-padded", "two-then-one-image"])
def test_prefix_sharing_under_checkpointing_matches_unshared(tiny_dir, one_thread, examples):
    # Shared prompt + activation checkpointing against repeated rows without checkpointing: same
    # values and gradients, and the prompt goes through the decoder once per group.
    plain, processor = load_policy(str(tiny_dir))
    plain.train()
    checkpointed, _ = load_policy(str(tiny_dir))
    checkpointed.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
    checkpointed.train()
    P, G, T = len(examples), 3, 8
    inputs = _batch(processor, examples)
    rows = torch.arange(P).repeat_interleave(G)
    ids, mask, weight = _completions(P * G, T, 800, seed=3)

    expected = _reference(plain, repeat_inputs(inputs, G), ids, mask)
    expected_grads = _grads(plain, expected, weight, mask)
    seen, handle = _count_rows_tokens(checkpointed)
    ours = completion_logprobs(checkpointed, inputs, ids, mask, prompt_rows=rows)
    handle.remove()
    L = inputs["input_ids"].shape[1]
    assert seen == [P * L, P * G * (T - 1)], "one prompt forward per group, then the completions"
    real = mask.bool()
    torch.testing.assert_close(ours[real], expected[real], atol=1e-5, rtol=0)
    ours_grads = _grads(checkpointed, ours, weight, mask)
    assert set(ours_grads) == set(expected_grads) and any("visual" in n for n in ours_grads)
    for name, g in expected_grads.items():
        torch.testing.assert_close(ours_grads[name], g, atol=1e-5, rtol=1e-4, msg=name)
