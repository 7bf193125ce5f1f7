"""The policy as the train loop builds it (grpo/policy.py, grpo.train): the reference pass, frozen
vision, pixel caps, activation checkpointing and bf16 autocast, each checked for what it computes,
not only that a run with it finishes."""

from __future__ import annotations

import pytest
import torch
from conftest import solid
from test_soft_head import _completion_batch

from common.config import load_config
from grpo.loss import grpo_loss
from grpo.policy import build_policy, reference_logprobs
from grpo.rollout import RolloutBuffer, buffer_logprobs, encode_samples
from grpo.train import autocast, update_pass
from models.logprobs import completion_logprobs
from models.qwen_vl import build_inputs, load_policy, render_prompt

CPU = torch.device("cpu")
G = 2
COMPLETIONS = [  # two completions per prompt: one well-formed, one not
    "<think>I look at the image.</think><answer>3</answer>",
    "<think>red</think><answer>6",
]

pytestmark = pytest.mark.usefixtures("one_thread")


def policy_config(model_dir, *overrides: str):
    base = [f"model.name_or_path={model_dir}", "model.dtype=float32", "model.lora_dropout=0.0",
            f"grpo.group_size={G}", "grpo.minibatch_size=4", "grpo.kl_coef=0.1"]  # fmt: skip
    return load_config("experiments/tiny.yaml", base + list(overrides))


@pytest.fixture(scope="module")
def train_batch(synthetic_ir):
    from data.imagereward import read_train

    ts = read_train(synthetic_ir)
    samples = ts.samples[:3]
    return samples, [[r.load() for r in s.images] for s in samples], ts.rating_values


def fixed_buffer(processor, train_batch) -> RolloutBuffer:
    """The rollout buffer of ``train_batch``'s prompts × G fixed completions (nothing sampled),
    advantages ±1, prompts shared as in training (``grpo.share_prefix``)."""
    samples, images, rating_values = train_batch
    ids, mask = _completion_batch(processor, COMPLETIONS * len(samples))  # (N, T), each text + end of turn
    inputs = encode_samples(processor, samples, images, rating_values)
    buf = RolloutBuffer(inputs, G, ids, mask, COMPLETIONS * len(samples), torch.zeros(len(ids), dtype=torch.bool),
                        samples, share_prefix=True)  # fmt: skip
    buf.advantages_N = torch.tensor([1.0, -1.0] * len(samples))  # (N,)
    return buf


# ------------------------------------------------------------------------------ the reference


@pytest.mark.parametrize("mode", ["lora", "full"])
def test_reference_stays_the_starting_model_after_an_update(cold_tiny_dir, train_batch, mode):
    """After one AdamW step, π_ref is still the model we started from and π_θ is not, so KL > 0.

    Mutations checked by hand: ``reference_logprobs`` without ``policy.disable_adapter()`` (the
    LoRA "reference" is the policy itself, KL ≡ 0) fails [lora]; scoring the frozen copy's
    completions with the policy instead of the copy fails [full]."""
    lora = ("model.lora_rank=4", "model.lora_alpha=8") if mode == "lora" else ()
    cfg = policy_config(cold_tiny_dir, *lora)
    policy, reference, processor = build_policy(cfg, CPU)
    assert (reference is None) == (mode == "lora"), "LoRA turns its adapters off; full FT keeps a frozen copy"
    buf = fixed_buffer(processor, train_batch)
    base, _ = load_policy(str(cold_tiny_dir))
    start_logp = buffer_logprobs(base, buf, 4, 1.0)
    buf.ref_logp_NT = reference_logprobs(policy, reference, buf, 4, 1.0)
    torch.testing.assert_close(buf.ref_logp_NT, start_logp, atol=1e-6, rtol=0)

    optimizer = torch.optim.AdamW([p for p in policy.parameters() if p.requires_grad], lr=1e-2)
    update_pass(policy.train(), optimizer, buf, cfg, CPU)
    policy.eval()
    ref_logp = reference_logprobs(policy, reference, buf, 4, 1.0)
    policy_logp = buffer_logprobs(policy, buf, 4, 1.0)
    real = buf.mask_NT.bool()
    torch.testing.assert_close(ref_logp, start_logp, atol=1e-6, rtol=0)
    assert (policy_logp - ref_logp)[real].abs().max() > 1e-3, "the step must have moved the policy"
    _, stats = grpo_loss(policy_logp, policy_logp, ref_logp, buf.advantages_N, buf.mask_NT.float(),
                         cfg.grpo.clip_eps, cfg.grpo.kl_coef)  # fmt: skip
    assert stats["kl"] > 1e-6


def test_freeze_vision_in_full_finetuning_trains_only_the_language_model(cold_tiny_dir, train_batch):
    """Mutation checked by hand: build_policy without ``visual.requires_grad_(False)`` fails it."""
    cfg = policy_config(cold_tiny_dir, "model.freeze_vision=true", "grpo.kl_coef=0")
    policy, _, processor = build_policy(cfg, CPU)
    before = {n: p.detach().clone() for n, p in policy.named_parameters()}
    # the optimizer of grpo.train: every parameter that requires a gradient
    optimizer = torch.optim.AdamW([p for p in policy.parameters() if p.requires_grad], lr=1e-2)
    update_pass(policy.train(), optimizer, fixed_buffer(processor, train_batch), cfg, CPU)
    after = dict(policy.named_parameters())
    vision = [n for n in before if n.startswith("model.visual.")]
    language = [n for n in before if n.startswith("model.language_model.")]
    assert vision and language
    assert all(torch.equal(before[n], after[n]) for n in vision), "a vision weight moved"
    moved = [n for n in language if not torch.equal(before[n], after[n])]
    assert len(moved) == len(language), f"{len(language) - len(moved)} language weights did not move"


# ----------------------------------------------------------------------------- pixel overrides


@pytest.mark.parametrize(
    "overrides, size, tokens",
    [
        ((), 64, 4),  # 64×64 → 56×56 (multiples of 28) → 4×4 patches → 2×2 merged = 4 tokens
        ((), 200, 49),  # 200×200 → 196×196 → 14×14 patches → 7×7 = 49 tokens
        (("model.max_pixels=3136",), 200, 4),  # capped at 56² pixels → 56×56 → 4 tokens
        (("model.min_pixels=12544",), 64, 16),  # at least 112² pixels → 112×112 → 8×8 patches → 16 tokens
    ],
)
def test_pixel_overrides_set_the_image_token_count(tiny_dir, overrides, size, tokens):
    """Mutation checked by hand: build_policy dropping ``model.min_pixels`` fails it."""
    from data.prompts import messages_for
    from eval.rank import load_model

    cfg = policy_config(tiny_dir, "grpo.kl_coef=0", *overrides)
    _, _, train_processor = build_policy(cfg, CPU)
    _, rank_processor = load_model(
        str(tiny_dir), "float32", "cpu", cfg.model.min_pixels, cfg.model.max_pixels
    )
    for processor in (train_processor, rank_processor):
        text = render_prompt(processor, messages_for("rating", "a red circle", 1, (1, 2, 3)))
        inputs = build_inputs(processor, [text], [[solid("red", size)]])
        assert int(inputs["mm_token_type_ids"].sum()) == tokens


# ----------------------------------------------------------- activation checkpointing and bf16


def _logp_and_grads(
    model, buf: RolloutBuffer, cfg, calls=None
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Log-probs of the whole buffer as the update pass computes them, and the gradient of their
    advantage-weighted sum. ``calls`` (a list): "backward" is set as its last item before the backward."""
    mb = next(buf.minibatches(buf.num_completions))
    model.zero_grad(set_to_none=True)
    with autocast(cfg, CPU):
        logp = completion_logprobs(model, mb.inputs, mb.ids_NT, mb.mask_NT, 1.0, mb.prompt_rows)
    if calls is not None:
        calls.append("backward")
    ((logp * mb.mask_NT).sum(dim=1) * mb.advantages_N).sum().backward()
    return logp.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


def test_activation_checkpointing_recomputes_the_same_logprobs_and_gradients(cold_tiny_dir, train_batch):
    """Mutation checked by hand: build_policy ignoring ``model.gradient_checkpointing`` fails it."""
    plain_cfg = policy_config(cold_tiny_dir, "grpo.kl_coef=0")
    ckpt_cfg = policy_config(cold_tiny_dir, "grpo.kl_coef=0", "model.gradient_checkpointing=true")
    plain, _, processor = build_policy(plain_cfg, CPU)
    ckpt, _, _ = build_policy(ckpt_cfg, CPU)
    buf = fixed_buffer(processor, train_batch)

    def recomputed(model, cfg):  # calls inside decoder layer 0 during the backward: checkpointing reruns it
        calls = []  # (the layer's own hooks stay outside the checkpoint; those of its attention run again)
        attention = model.model.language_model.layers[0].self_attn
        hook = attention.register_forward_pre_hook(lambda *_: calls.append("layer"))
        result = _logp_and_grads(model.train(), buf, cfg, calls)
        hook.remove()
        return result, calls[calls.index("backward") :].count("layer")

    (logp_plain, grads_plain), rerun_plain = recomputed(plain, plain_cfg)
    (logp_ckpt, grads_ckpt), rerun_ckpt = recomputed(ckpt, ckpt_cfg)
    assert rerun_plain == 0 and rerun_ckpt >= 1, "model.gradient_checkpointing=true does not checkpoint"
    real = buf.mask_NT.bool()
    torch.testing.assert_close(logp_ckpt[real], logp_plain[real], atol=1e-5, rtol=0)
    assert set(grads_ckpt) == set(grads_plain) and any("visual" in n for n in grads_plain)
    for name, g in grads_plain.items():
        torch.testing.assert_close(grads_ckpt[name], g, atol=1e-5, rtol=1e-4, msg=name)


def test_bf16_autocast_logprobs_and_gradients_are_close_to_float32(cold_tiny_dir, train_batch):
    """Mutation checked by hand: ``grpo.train.autocast`` ignoring ``train.bf16`` fails it."""
    fp32_cfg = policy_config(cold_tiny_dir, "grpo.kl_coef=0")
    bf16_cfg = policy_config(cold_tiny_dir, "grpo.kl_coef=0", "train.bf16=true")
    model, _, processor = build_policy(fp32_cfg, CPU)
    buf = fixed_buffer(processor, train_batch)
    model.train()
    logp32, grads32 = _logp_and_grads(model, buf, fp32_cfg)
    logp16, grads16 = _logp_and_grads(model, buf, bf16_cfg)
    real = buf.mask_NT.bool()
    diff = (logp16 - logp32)[real].abs()
    assert diff.max() > 0, "train.bf16 did not change the computation: autocast is off"
    # bf16 keeps 8 bits of mantissa (relative spacing 2^-8 ≈ 0.4%): log-probs of a few units
    # agree to a few hundredths, on average to much less.
    assert diff.max() < 0.1 and diff.mean() < 0.02, (diff.max(), diff.mean())
    flat32 = torch.cat([g.flatten() for g in grads32.values()])
    flat16 = torch.cat([grads16[n].flatten() for n in grads32])
    cosine = torch.nn.functional.cosine_similarity(flat32, flat16, dim=0)
    assert cosine > 0.99, f"bf16 gradient points elsewhere (cosine {cosine:.4f})"
