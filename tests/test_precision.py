"""Mixed precision as shipped: float32 master weights under bfloat16 compute.

The shipped experiments (``experiments/imagereward.yaml``, ``hpsv2.yaml``) fine-tune every
language-model weight with ``model.dtype: bfloat16`` at lr 1e-6. Stepping bfloat16 weights
directly rounds such updates away (docs/facts.md: 98% of weights unchanged after 100 steps); the
policy must keep float32 master weights and still compute in bfloat16.
"""

from __future__ import annotations

import pytest
import torch
from test_train import tiny_config, weights

from common.config import ConfigError, load_config
from grpo.policy import build_policy
from grpo.train import train

PROJECTIONS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


def _decoder_projections(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    return {
        k: v.float()
        for k, v in state.items()
        if ".layers." in k
        and "visual" not in k
        and k.endswith(".weight")
        and any(p in k for p in PROJECTIONS)
    }


@pytest.mark.slow
def test_shipped_precision_updates_every_decoder_weight(cold_tiny_dir, synthetic_ir, tmp_path, one_thread):
    # The shipped experiment's precision settings on the tiny model: bf16, full fine-tuning, lr 1e-6.
    # Before the fix, AdamW stepped bfloat16 weights and not one of these projections changed.
    cfg = tiny_config(cold_tiny_dir, synthetic_ir, tmp_path / "run", "model.dtype=bfloat16", "train.bf16=true",
                      "model.lora_rank=0", "train.lr=1e-6", "train.warmup_steps=0", "train.steps=2",
                      "grpo.kl_coef=0.04")  # fmt: skip
    before = _decoder_projections(weights(cold_tiny_dir))
    after = _decoder_projections(weights(train(cfg)))
    saved = weights(tmp_path / "run" / "checkpoint-000002")
    assert before.keys() == after.keys() and len(before) == 2 * len(PROJECTIONS)
    changed = sum(int((after[k] != before[k]).sum()) for k in before)
    total = sum(v.numel() for v in before.values())
    assert changed / total >= 0.99, f"only {changed / total:.1%} of the decoder projection weights changed"
    assert all(saved[k].dtype == torch.float32 for k in after), "checkpoints keep the float32 master weights"


def test_trainable_weights_are_float32_and_frozen_ones_bfloat16(tiny_dir, synthetic_ir, tmp_path):
    cfg = tiny_config(tiny_dir, synthetic_ir, tmp_path, "model.dtype=bfloat16", "model.freeze_vision=true")
    policy, reference, _ = build_policy(cfg, torch.device("cpu"))
    trainable = [p for p in policy.parameters() if p.requires_grad]
    assert trainable and all(p.dtype == torch.float32 for p in trainable)
    assert all(p.dtype == torch.bfloat16 for p in policy.model.visual.parameters()), "frozen vision tower"
    assert all(p.dtype == torch.bfloat16 and not p.requires_grad for p in reference.parameters())


def test_lora_adapters_are_float32_over_a_bfloat16_base(tiny_dir, synthetic_ir, tmp_path):
    cfg = tiny_config(tiny_dir, synthetic_ir, tmp_path, "model.dtype=bfloat16", "model.lora_rank=4")
    policy, reference, _ = build_policy(cfg, torch.device("cpu"))
    assert reference is None, "LoRA's reference is the base model with adapters off"
    named = dict(policy.named_parameters())
    assert all(named[n].dtype == torch.float32 for n in named if named[n].requires_grad)
    assert all(p.dtype == torch.bfloat16 for n, p in named.items() if not p.requires_grad)


def test_float16_is_refused_with_a_reason():
    with pytest.raises(ConfigError, match="float16.*loss scaling"):
        load_config("experiments/imagereward.yaml", ["model.dtype=float16"])
