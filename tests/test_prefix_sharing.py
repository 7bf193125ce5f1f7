"""Prefix sharing: one prompt forward per group, in sampling and in the log-prob passes.

The shared path must be the same computation as repeating every prompt G times: with
``generate``'s draw, the samples ``generate`` would draw with the same seed, log-probs that match the sampling distribution to
1e-5, and the same gradients.
"""

from __future__ import annotations

import copy

import pytest
import torch
from conftest import biased_towards_eos, sampled_logprobs, solid
from test_models import MIXED, ONE, TWO, _batch

from common.config import load_config
from grpo.rollout import RolloutBuffer, buffer_logprobs
from grpo.train import update_pass
from models.logprobs import completion_logprobs
from models.qwen_vl import repeat_inputs
from models.sampling import draw_tokens_as_generate, sample_completions

CASES = pytest.mark.parametrize(
    "examples", [ONE, TWO, MIXED], ids=["one-image", "two-images", "mixed-left-padded"]
)


def _rows(n_prompts: int, G: int) -> torch.Tensor:
    return torch.arange(n_prompts).repeat_interleave(G)  # completion n → prompt n // G


@pytest.fixture(scope="module")
def eos_prone(tiny):
    """The tiny model with a bias towards end-of-turn (~15% per token), so completions end at
    varied lengths and the eos / padding / min_new_tokens paths run."""
    model, processor = tiny
    return biased_towards_eos(model, processor, 5.0), processor


@CASES
def test_shared_sampling_logprobs_match_its_distribution(tiny, examples):
    model, processor = tiny
    inputs = _batch(processor, examples)
    G = 3
    torch.manual_seed(0)
    comp, logits_NTV = sample_completions(
        model, processor, inputs, G, max_new_tokens=16, return_scores=True, share_prefix=True
    )
    assert comp.ids_NT.shape[0] == len(examples) * G
    sampled_logp = sampled_logprobs(logits_NTV, comp.ids_NT, processor)
    real = comp.mask_NT.bool()
    repeated = completion_logprobs(model, repeat_inputs(inputs, G), comp.ids_NT, comp.mask_NT)
    shared = completion_logprobs(
        model, inputs, comp.ids_NT, comp.mask_NT, prompt_rows=_rows(len(examples), G)
    )
    torch.testing.assert_close(repeated[real], sampled_logp[real], atol=1e-5, rtol=0)
    torch.testing.assert_close(shared[real], sampled_logp[real], atol=1e-5, rtol=0)


@CASES
@pytest.mark.parametrize("min_new_tokens", [0, 6])
def test_shared_sampling_draws_what_generate_draws(eos_prone, examples, min_new_tokens):
    # Same seed, same distribution, generate's multinomial draw per step: the same tokens, eos and
    # padding included.
    model, processor = eos_prone
    inputs = _batch(processor, examples)
    torch.manual_seed(7)
    ours = sample_completions(model, processor, inputs, 4, 20, min_new_tokens=min_new_tokens, share_prefix=True,
                              draw=draw_tokens_as_generate)  # fmt: skip
    torch.manual_seed(7)
    theirs = sample_completions(
        model, processor, inputs, 4, 20, min_new_tokens=min_new_tokens, share_prefix=False
    )
    lengths = ours.mask_NT.sum(dim=1)
    assert lengths.min() < lengths.max() <= 20, "the eos bias must end completions at varied lengths"
    assert torch.equal(ours.ids_NT, theirs.ids_NT) and torch.equal(ours.mask_NT, theirs.mask_NT)
    assert ours.texts == theirs.texts and torch.equal(ours.truncated_N, theirs.truncated_N)
    if min_new_tokens:
        assert lengths.min() > min_new_tokens, "no end of turn before min_new_tokens"


def test_shared_samples_are_valid(eos_prone):
    model, processor = eos_prone
    inputs = _batch(processor, MIXED)
    torch.manual_seed(1)
    comp = sample_completions(
        model, processor, inputs, 5, max_new_tokens=24, min_new_tokens=3, share_prefix=True
    )
    vision = torch.tensor(processor.tokenizer.convert_tokens_to_ids(["<|image_pad|>", "<|vision_start|>"]))
    assert not torch.isin(comp.ids_NT, vision).any()
    # <|im_end|> and <|endoftext|> (= the pad token) both end a completion
    eos = set(model.generation_config.eos_token_id)
    pad = processor.tokenizer.pad_token_id
    for ids, mask, truncated in zip(comp.ids_NT, comp.mask_NT, comp.truncated_N):
        n = int(mask.sum())
        assert n >= 4, "min_new_tokens=3: the end of turn comes 4th at the earliest"
        assert mask[:n].all() and not mask[n:].any(), "mask is a prefix"
        assert not eos & set(ids[: n - 1].tolist()) and (ids[n:] == pad).all(), "only padding follows the end"
        assert bool(truncated) == (int(ids[n - 1]) not in eos)


def test_shared_logprob_gradients_match_repeated_rows(tiny_dir):
    from models.qwen_vl import load_policy

    model, processor = load_policy(str(tiny_dir))
    model.train()
    inputs = _batch(processor, MIXED)
    G, T = 2, 7
    torch.manual_seed(3)
    ids = torch.randint(0, 800, (3 * G, T))
    mask = (torch.arange(T) < torch.tensor([7, 3, 5, 7, 1, 6])[:, None]).long()  # (N, T) right padded
    weight = torch.randn(3 * G, T)

    def grads(logp):
        model.zero_grad(set_to_none=True)
        (logp * weight * mask).sum().backward()
        return {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}

    repeated = grads(completion_logprobs(model, repeat_inputs(inputs, G), ids, mask))
    shared = grads(completion_logprobs(model, inputs, ids, mask, prompt_rows=_rows(3, G)))
    assert set(shared) == set(repeated) and any("visual" in n for n in shared)
    for name in repeated:
        torch.testing.assert_close(shared[name], repeated[name], atol=1e-5, rtol=1e-4, msg=name)


def test_gradient_checkpointing_keeps_prefix_sharing(tiny_dir):
    # Checkpointed layers drop transformers' own KV cache; ours never grows, so they keep it and the
    # shared path stays shared and exact (gradients: tests/test_chunked_logprobs.py).
    from models.qwen_vl import load_policy

    model, processor = load_policy(str(tiny_dir))
    model.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
    model.train()
    inputs = _batch(processor, TWO + ONE)
    ids = torch.randint(0, 800, (4, 5))
    mask = torch.ones_like(ids)
    images = []
    hook = model.model.visual.register_forward_pre_hook(lambda m, args, kw: images.append(len(kw.get("grid_thw", args[-1]))),
                                                        with_kwargs=True)  # fmt: skip
    shared = completion_logprobs(model, inputs, ids, mask, prompt_rows=_rows(2, 2))
    repeated = completion_logprobs(model, repeat_inputs(inputs, 2), ids, mask)
    hook.remove()
    assert images == [3, 6], "shared: the 3 images of the 2 prompts once; repeated: twice"
    torch.testing.assert_close(shared, repeated, atol=1e-5, rtol=0)


def test_rollout_minibatches_hold_each_prompt_once(tiny, tmp_path):
    model, processor = tiny
    inputs = _batch(processor, MIXED + [("rating", "a blue house", [solid("blue", 72)])])
    G, T = 3, 6
    torch.manual_seed(4)
    ids = torch.randint(0, 800, (4 * G, T))
    mask = torch.ones_like(ids)
    args = (inputs, G, ids, mask, [""] * (4 * G), torch.zeros(4 * G, dtype=torch.bool), [None] * 4)
    plain, shared = RolloutBuffer(*args, share_prefix=False), RolloutBuffer(*args, share_prefix=True)
    mb = shared.minibatch(torch.arange(4, 9))  # completions 4…8: the tail of prompt 1, all of prompt 2
    assert mb.inputs["input_ids"].shape[0] == 2 and mb.prompt_rows.tolist() == [0, 0, 1, 1, 1]
    assert plain.minibatch(torch.arange(4, 9)).prompt_rows is None
    # Minibatches of 5 split groups; the log-probs must not notice.
    expected = buffer_logprobs(model, plain, minibatch_size=5, temperature=1.0)
    torch.testing.assert_close(buffer_logprobs(model, shared, 5, 1.0), expected, atol=1e-5, rtol=0)


def test_update_pass_is_the_same_with_shared_prefixes(tiny_dir, tmp_path):
    # One SGD step with lr 1 moves every weight by its gradient: shared and repeated passes must agree.
    from models.qwen_vl import load_policy

    model, processor = load_policy(str(tiny_dir))
    inputs = _batch(processor, MIXED)
    G, T = 2, 5
    torch.manual_seed(5)
    ids = torch.randint(0, 800, (3 * G, T))
    mask = torch.ones_like(ids)
    # float32 compute: the default model.dtype=bfloat16 autocasts, and bf16 rounding differs by path.
    cfg = load_config(
        None, ["grpo.group_size=2", "grpo.minibatch_size=4", "grpo.kl_coef=0.1", "model.dtype=float32"]
    )
    moved = []
    for share in (False, True):
        m = copy.deepcopy(model).train()
        buf = RolloutBuffer(inputs, G, ids, mask, [""] * 6, torch.zeros(6, dtype=torch.bool), [None] * 3,
                            share_prefix=share)  # fmt: skip
        buf.advantages_N = torch.tensor([1.0, -1.0, 0.5, -0.5, 2.0, -2.0])
        buf.ref_logp_NT = torch.full((6, T), -6.5)
        update_pass(m, torch.optim.SGD(m.parameters(), lr=1.0), buf, cfg, torch.device("cpu"))
        moved.append({n: p.detach() for n, p in m.named_parameters()})
    assert any(not torch.equal(moved[0][n], p) for n, p in model.named_parameters())
    for name in moved[0]:
        torch.testing.assert_close(moved[1][name], moved[0][name], atol=1e-5, rtol=1e-4, msg=name)
