"""The trainable policy and its frozen reference.

Two ways to train, chosen by ``model.lora_rank``:

- **LoRA** (``lora_rank > 0``, peft): adapters on the language model's projections (and on the
  vision blocks when ``freeze_vision`` is off). The reference policy is the same model with its
  adapters disabled, so no second copy of the weights is needed: with adapters off the model is
  exactly the checkpoint it started from.
- **Full fine-tuning** (``lora_rank = 0``): every language-model weight trains (the vision tower
  too unless ``freeze_vision``); the reference is a separate frozen copy loaded from the original
  checkpoint (no grad, eval mode, never updated). With β = 0 no reference is loaded at all.

Precision (mixed, as every large-model trainer does it): **trainable weights are float32 master
weights**, whatever ``model.dtype`` says, and the forward passes compute in bfloat16 under
autocast (``grpo.train.autocast``). ``model.dtype`` is the storage dtype of the *frozen* weights
only: the reference copy, a frozen vision tower, LoRA's base model. Why: an AdamW update at the
paper's lr 1e-6 is far below half the bfloat16 spacing of a typical weight (|w| ≈ 0.02 → spacing
≈ 1.2e-4), so stepping bfloat16 weights directly rounds ~98% of the updates away and trains
nothing, silently (docs/facts.md). The cost: 4 bytes per trainable parameter for the weight, 4 for
its gradient and 8 for Adam's two moments, 16 B in all, where pure bfloat16 takes 8 B (2 + 2 + 4:
torch's AdamW keeps both moments in the weight's dtype); docs/real-runs.md gives the totals for
the 7B. Checkpoints keep the float32 master weights, so resume is exact.
"""

from __future__ import annotations

from pathlib import Path

import torch

from common.config import LANGUAGE_LORA_TARGET, VISION_LORA_TARGET, Config
from models.qwen_vl import load_policy, set_pixel_bounds


def build_policy(cfg: Config, device: torch.device, resume_from: Path | None = None):
    """``(policy, reference or None, processor)``; weights from ``resume_from`` when resuming."""
    m = cfg.model
    kwargs = dict(device=device, attn_implementation=m.attn_implementation or None)
    full_ft = m.lora_rank == 0
    source = str(resume_from) if (resume_from is not None and full_ft) else m.name_or_path
    # Full fine-tuning trains the checkpoint's own weights: load them as float32 masters. LoRA trains
    # only its adapters (float32, peft's default), so the base loads in the storage dtype.
    policy, processor = load_policy(source, dtype=torch.float32 if full_ft else m.dtype, **kwargs)
    set_pixel_bounds(processor, m.min_pixels, m.max_pixels)

    reference = None
    if full_ft:
        if m.freeze_vision:  # frozen: stored in model.dtype like every other frozen weight
            policy.model.visual.requires_grad_(False).to(getattr(torch, m.dtype))
        if cfg.grpo.kl_coef > 0:
            reference, _ = load_policy(m.name_or_path, dtype=m.dtype, **kwargs)
            reference.eval().requires_grad_(False)
    else:
        from peft import LoraConfig, get_peft_model, set_peft_model_state_dict

        target = (
            LANGUAGE_LORA_TARGET if m.freeze_vision else f"({LANGUAGE_LORA_TARGET})|({VISION_LORA_TARGET})"
        )
        lora = LoraConfig(
            r=m.lora_rank, lora_alpha=m.lora_alpha, lora_dropout=m.lora_dropout, target_modules=target
        )
        policy = get_peft_model(policy, lora)
        if resume_from is not None:
            from safetensors.torch import load_file

            result = set_peft_model_state_dict(policy, load_file(resume_from / "adapter_model.safetensors"))
            assert not result.unexpected_keys, f"adapter keys not in the model: {result.unexpected_keys[:3]}"
    if m.gradient_checkpointing:
        # transformers 5 renamed gradient checkpointing to activation checkpointing (and its kwargs).
        if hasattr(policy, "activation_checkpointing_enable"):
            policy.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
        else:
            policy.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        policy.config.use_cache = False
    return policy, reference, processor


@torch.no_grad()
def reference_logprobs(policy, reference, buffer, minibatch_size: int, temperature: float) -> torch.Tensor:
    """log π_ref of the buffered completions, (N, T): the frozen copy, or LoRA with adapters off."""
    from grpo.rollout import buffer_logprobs

    if reference is not None:
        return buffer_logprobs(reference, buffer, minibatch_size, temperature)
    assert hasattr(policy, "disable_adapter"), "β > 0 needs a reference: LoRA or a frozen copy"
    with policy.disable_adapter():
        return buffer_logprobs(policy, buffer, minibatch_size, temperature)
