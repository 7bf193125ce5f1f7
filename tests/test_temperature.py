"""Temperature ≠ 1: the completions are drawn from softmax(f / τ) and every log-prob pass scores
that same distribution (models/sampling.py, models/logprobs.py, the GRPO step in grpo/train.py)."""

from __future__ import annotations

import copy

import pytest
import torch
from conftest import sampled_logprobs
from test_models import MIXED, _batch

from common.config import load_config
from grpo.policy import build_policy
from grpo.train import grpo_step
from models.logprobs import completion_logprobs
from models.qwen_vl import repeat_inputs
from models.sampling import sample_completions

TAU = 0.5
CPU = torch.device("cpu")

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.mark.parametrize("share_prefix", [False, True], ids=["generate", "shared-prefix"])
def test_logprobs_at_a_temperature_are_those_of_the_sampling_distribution(tiny, share_prefix):
    model, processor = tiny
    inputs = _batch(processor, MIXED)
    G = 2
    torch.manual_seed(0)
    comp, raw_NTV = sample_completions(model, processor, inputs, G, max_new_tokens=12, temperature=TAU,
                                       return_scores=True, share_prefix=share_prefix)  # fmt: skip
    real = comp.mask_NT.bool()
    # generate's raw logits f; the distribution sampled at τ is softmax(f / τ)
    sampled = sampled_logprobs(raw_NTV, comp.ids_NT, processor, TAU)
    ours = completion_logprobs(model, repeat_inputs(inputs, G), comp.ids_NT, comp.mask_NT, temperature=TAU)
    torch.testing.assert_close(ours[real], sampled[real], atol=1e-5, rtol=0)
    at_one = completion_logprobs(model, repeat_inputs(inputs, G), comp.ids_NT, comp.mask_NT)
    assert (at_one - ours)[real].abs().max() > 1e-2, "τ = 0.5 must change the log-probs"


@pytest.mark.parametrize("share_prefix", [False, True], ids=["generate", "shared-prefix"])
def test_sampled_tokens_follow_softmax_of_logits_over_temperature(tiny, share_prefix):
    """500 first tokens of one prompt: the mean logit f of the sampled tokens is its expectation
    under softmax(f / τ), not under softmax(f).

    The tiny model's logits are nearly flat; its LM head scaled ×6 gives a distribution that
    temperature visibly reshapes (measured: E_τ[f] 2.73, E_1[f] 1.67, standard error 0.04).
    Mutation checked by hand: the shared-prefix sampler not dividing by τ fails it."""
    model, processor = tiny
    model = copy.deepcopy(model)
    model.lm_head.weight.data *= 6.0
    inputs = _batch(processor, MIXED[:1])
    n = 500
    torch.manual_seed(0)
    comp, raw_NTV = sample_completions(model, processor, inputs, n, max_new_tokens=1, temperature=TAU,
                                       return_scores=True, share_prefix=share_prefix)  # fmt: skip
    f_V = raw_NTV[0, 0].float()  # every row continues the same prompt: the same first-step logits
    mean_f = f_V[comp.ids_NT[:, 0]].mean()
    p_tau, p_one = torch.softmax(f_V / TAU, -1), torch.softmax(f_V, -1)
    e_tau, e_one = (p_tau * f_V).sum(), (p_one * f_V).sum()
    stderr = ((p_tau * (f_V - e_tau) ** 2).sum() / n).sqrt()
    assert abs(e_tau - e_one) > 15 * stderr, "the test needs logits that temperature reshapes"
    assert abs(mean_f - e_tau) < 4 * stderr, (mean_f, e_tau, stderr)


def test_grpo_step_samples_and_scores_at_the_configured_temperature(tiny_dir, synthetic_ir):
    """One GRPO step at τ = 0.5 draws exactly what ``sample_completions(τ)`` draws from the same
    seed, its reference log-probs are those at τ, and at the first step (π_θ = π_ref) its KL is 0:
    a pass that forgot τ would score another distribution than the one sampled. (The random
    tiny model, whose every token is uncertain: a cold-started one writes its fixed thought
    alike at any temperature.)

    Mutations checked by hand, each fails this test: grpo_step sampling at 1.0, the update pass
    or the reference pass scoring at 1.0."""
    from data.imagereward import read_train
    from grpo.rollout import encode_samples

    ts = read_train(synthetic_ir)
    samples = ts.samples[:2]
    images = [[r.load() for r in s.images] for s in samples]
    cfg = load_config("experiments/tiny.yaml", [
        f"model.name_or_path={tiny_dir}", "model.dtype=float32", f"grpo.temperature={TAU}",
        "grpo.group_size=3", "grpo.max_new_tokens=16", "grpo.kl_coef=0.1", "grpo.minibatch_size=4"])  # fmt: skip
    policy, reference, processor = build_policy(cfg, CPU)
    start = copy.deepcopy(policy).eval()
    optimizer = torch.optim.AdamW(policy.parameters(), lr=1e-3)
    torch.manual_seed(0)
    buf, metrics = grpo_step(policy, policy, reference, processor, optimizer, samples, images,
                             ts.rating_values, cfg, CPU)  # fmt: skip

    inputs = encode_samples(processor, samples, images, ts.rating_values)
    torch.manual_seed(0)
    comp = sample_completions(start, processor, inputs, 3, 16, TAU, share_prefix=cfg.grpo.share_prefix)
    assert torch.equal(comp.ids_NT, buf.ids_NT), "the step did not sample at grpo.temperature"
    ref = completion_logprobs(start, repeat_inputs(inputs, 3), buf.ids_NT, buf.mask_NT, temperature=TAU)
    real = buf.mask_NT.bool()
    torch.testing.assert_close(buf.ref_logp_NT[real], ref[real], atol=1e-5, rtol=0)
    assert abs(metrics["kl"]) < 1e-6, metrics["kl"]
