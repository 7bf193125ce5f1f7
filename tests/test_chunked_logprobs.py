"""Log-probs without (N, T, V) logits: the chunked LM head + log-softmax against the
obvious full-vocabulary computation, on the tiny model and on a model of the real configuration
(V = 152,064); and prefix sharing under activation checkpointing against the unshared path."""

from __future__ import annotations

import pytest
import torch
from test_models import MIXED, ONE, TWO, _batch

import models.logprobs
from models.logprobs import (
    _module_logprobs,
    completion_logits,
    completion_logprobs,
    selective_log_softmax,
    token_logprobs,
)
from models.qwen_vl import load_policy, repeat_inputs


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


def _reference(model, inputs, ids, mask, temperature=1.0):
    """Today's computation: (N, T, V) float32 logits, then the log-softmax of the taken tokens."""
    return selective_log_softmax(completion_logits(model, inputs, ids, mask, temperature), ids)


def _assert_same(model, inputs, ids, mask, weight, prompt_rows=None, reference_inputs=None, temperature=1.0):
    real = mask.bool()
    expected = _reference(model, reference_inputs or inputs, ids, mask, temperature)
    expected_grads = _grads(model, expected, weight, mask)
    ours = completion_logprobs(model, inputs, ids, mask, temperature, prompt_rows=prompt_rows)
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


def test_chunked_logprobs_at_a_temperature_match_full_logits(tiny_dir, one_thread, monkeypatch):
    model, processor = load_policy(str(tiny_dir))
    model.train()
    monkeypatch.setattr(models.logprobs, "LOGITS_CHUNK_BYTES", 7 * 4 * model.lm_head.out_features)
    inputs = repeat_inputs(_batch(processor, MIXED), 2)
    ids, mask, weight = _completions(6, 9, 800, seed=4)
    _assert_same(model, inputs, ids, mask, weight, temperature=0.7)


def _head_case(V: int, dtype: torch.dtype, train_head: bool, seed: int):
    """An LM head, hidden states that need a gradient, taken tokens and a weight per position."""
    g = torch.Generator().manual_seed(seed)
    head = torch.nn.Linear(64, V, bias=False)
    with torch.no_grad():
        head.weight.copy_(torch.randn(V, 64, generator=g) * 0.2)
    head.to(dtype).requires_grad_(train_head)
    hidden = (torch.randn(3, 50, 64, generator=g)).to(dtype).requires_grad_(True)
    ids, mask, weight = _completions(3, 50, V, seed=seed)
    return head, hidden, ids, mask, weight


def _logprobs_and_grads(fn, head, hidden, ids, mask, weight):
    hidden.grad, head.weight.grad = None, None
    logp = fn()
    (logp * weight).sum().backward()
    grads = [hidden.grad] + ([head.weight.grad] if head.weight.requires_grad else [])
    return logp.detach(), [g.float() for g in grads]


@pytest.mark.parametrize(
    "setting", ["autocast", "bf16-frozen-head"], ids=["bf16-autocast-float32-head", "bf16-frozen-head"]
)
def test_fused_head_in_the_bf16_settings_matches_the_module_path(one_thread, setting):
    """``HeadLogprobs`` against the LM head called as a module (the path FSDP units take), where
    the matrix products run in bf16: under autocast over a trained float32 head (``train.bf16``),
    and a frozen bf16 head with bf16 hidden states (LoRA's base). 3 chunks; V = 152,064."""
    autocast = setting == "autocast"
    head, hidden, ids, mask, weight = _head_case(
        152_064, torch.float32 if autocast else torch.bfloat16, train_head=autocast, seed=5
    )
    suppressed = list(range(151_652, 151_657))
    chunk_bytes = 50 * 4 * 152_064  # 150 positions: 3 chunks of 50

    def run(fused: bool):
        def fn():
            with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
                if fused:
                    return token_logprobs(head, hidden, ids, mask, 0.7, chunk_bytes, suppressed)
                real = mask.bool()
                logp_M = _module_logprobs(head, hidden[real], ids[real], 0.7, torch.tensor(suppressed), 50)
                return torch.zeros(ids.shape).masked_scatter(real, logp_M)

        return _logprobs_and_grads(fn, head, hidden, ids, mask, weight)

    (ours, ours_grads), (theirs, their_grads) = run(fused=True), run(fused=False)
    real = mask.bool()
    torch.testing.assert_close(ours[real], theirs[real], atol=2e-2, rtol=0)
    assert len(ours_grads) == (2 if autocast else 1)
    for a, b in zip(ours_grads, their_grads):
        assert (a - b).norm() <= 0.02 * b.norm(), f"gradients differ by {(a - b).norm() / b.norm():.3g}"


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
    # a vocabulary dimension but the LM head's weight itself (each chunk's logits are recomputed in
    # the backward).
    model, processor = load_policy(str(like_dir))
    model.train()
    inputs = repeat_inputs(_batch(processor, ONE), 4)
    ids, mask, _ = _completions(4, 64, 151_000, seed=2)
    V = model.lm_head.out_features

    weights = {p.data_ptr() for p in model.parameters()}

    def saved_shapes(fn) -> list[tuple[int, ...]]:
        shapes = []  # of the saved tensors that are not a weight of the model

        def pack(t):
            if t.data_ptr() not in weights:
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
