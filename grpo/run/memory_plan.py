"""The memory plan of a run, before any GPU is touched (the command: ``python -m grpo.memory``).

The model of ``model.name_or_path`` (a local folder, or a ``config.json``; never a download) is
built on the meta device, so its exact parameter counts cost no memory. The plan gives, per rank,
the bytes of every resident state and of the transient peak of each phase of a GRPO step, and
says whether the run fits and which knob to turn if not.

Resident on every rank (``S`` = ranks sharing the state: 1 under DDP, ``--gpus`` under FSDP):

| item        | bytes | note |
|-------------|-------|------|
| weights     | 4·P_train / S | float32 master weights (``grpo.policy``) |
| gradients   | 4·P_train / S | DDP: + 4·P_train of bucket copies (``gradient_as_bucket_view`` off) |
| optimizer   | 8·P_train / S | AdamW's two moments |
| frozen      | d·P_frozen / S | a frozen vision tower or LoRA's base, in ``model.dtype`` (d bytes) |
| reference   | d·P_total / S | the frozen copy of full fine-tuning with β > 0 |

Transient, the largest of three phases:

- **rollout**: the sampling KV cache, ``2 · layers · kv_dim · (L + T) · B·G · c`` (c = 2 in bf16
  compute, 4 in float32), and under FSDP the whole policy gathered once (``c·P_total``).
- **reference / old log-probs**: one pass without gradients: the logits of a minibatch.
- **update**: activations of one minibatch (with and without activation checkpointing, below),
  the log-prob pass's logits (``10 B · M · T · V``: the float32 copy kept for backward, its
  gradient and the bf16 head output), the compute copy of the trainable weights (DDP under
  autocast: ``2·P_train``; FSDP: two gathered units and one unit's unsharded float32 gradient).
  The backward pass peaks at ``BACKWARD_FACTOR`` = 1.5 × the saved activations.

Activations per token and decoder layer (saved for backward; Korthikanti et al. 2022, counted for
Qwen2's layer with SDPA attention, no ``s²`` term): two RMSNorms ``2·(r + 4 + c)·h``, attention
``c·(5h + 4·kv)``, the SwiGLU MLP ``4·c·I`` (h hidden, kv key/value width, I MLP width, r the
residual stream's bytes: 4 with float32 masters). With activation checkpointing only each layer's
input ``r·h`` stays, plus one layer recomputed at a time. A trained vision tower adds the same per
patch (4 patches per image token). Tokens per minibatch: its completions × (prompt + T), the
prompt counted once per group when prefix sharing runs (``grpo.share_prefix`` without
checkpointing). ``L`` = text tokens (``--prompt-tokens``) + images × image tokens (``model.max_pixels``
/ 28², or ``--image-tokens``).

10% of the GPU is kept for the CUDA context, the allocator's fragmentation and NCCL buffers.
The plan is checked against measured peak memory on CPU in ``tests/test_memory.py`` (docs/real-runs.md
gives the figures).
"""

from __future__ import annotations

import copy
import dataclasses
import json
import os
import re
import sys
from pathlib import Path

import torch

from common.config import LANGUAGE_LORA_TARGET, VISION_LORA_TARGET, Config, ConfigError

GiB = 1024**3
RESERVE = 0.10  # of the GPU: CUDA context, fragmentation, communication buffers
PROMPT_TEXT_TOKENS = 160  # the rating template is 112 tokens with a 13-word prompt (real tokenizer)
LOGIT_BYTES = 10  # per logit element of the log-prob pass: float32 copy + its gradient + bf16 head output
BACKWARD_FACTOR = 1.5  # backward's peak over the saved activations (gradients of the layer in flight);
# measured 1.4 on CPU for one forward/backward of the tiny model (saved bytes checked with saved_tensors_hooks)


@dataclasses.dataclass
class ModelShape:
    """Parameter counts and widths of a Qwen2.5-VL configuration (from the meta model)."""

    total: int
    language: int  # the language model with embeddings and LM head
    vision: int
    largest_unit: int  # the largest FSDP unit: a decoder layer, the embeddings or the LM head
    lora_language: int  # LoRA parameters per unit of rank (r = 1) on the language model
    lora_vision: int
    layers: int
    hidden: int
    kv_dim: int
    intermediate: int
    vocab: int
    vision_layers: int
    vision_hidden: int
    vision_intermediate: int


def read_model_config(name_or_path: str, download: bool = False):
    """The ``Qwen2_5_VLConfig`` of a local folder or a ``config.json`` path (no download unless asked:
    ``grpo.train`` is about to download the checkpoint anyway)."""
    from transformers import AutoConfig

    path = Path(name_or_path)
    if path.is_file():
        path = path.parent if path.name == "config.json" else path
    if not (path / "config.json").is_file():
        try:  # a hub id already in the local cache is fine; a download only when asked
            return AutoConfig.from_pretrained(name_or_path, local_files_only=not download)
        except OSError:
            raise ConfigError(
                f"model.name_or_path={name_or_path}: no config.json there and none cached; pass a local "
                "checkpoint folder or its config.json (the plan never downloads)"
            ) from None
    return AutoConfig.from_pretrained(path, local_files_only=True)


def model_shape(name_or_path: str, download: bool = False) -> ModelShape:
    """Build the model on the meta device (no memory) and count its parameters."""
    from transformers import Qwen2_5_VLForConditionalGeneration

    config = read_model_config(name_or_path, download)
    with torch.device("meta"):
        model = Qwen2_5_VLForConditionalGeneration._from_config(config)
    text, vis = config.text_config, config.vision_config

    def count(module) -> int:
        return sum(p.numel() for p in module.parameters())

    def lora_per_rank(pattern: str) -> int:  # a rank-r adapter on Linear(i, o) adds r·(i + o)
        return sum(m.in_features + m.out_features for n, m in model.named_modules()
                   if isinstance(m, torch.nn.Linear) and re.fullmatch(pattern, n))  # fmt: skip

    lm = model.model.language_model
    units = [count(lm.layers[0]), count(lm.embed_tokens), count(model.lm_head)]
    return ModelShape(
        total=count(model),
        language=count(lm) + (0 if config.tie_word_embeddings else count(model.lm_head)),
        vision=count(model.model.visual),
        largest_unit=max(units),
        lora_language=lora_per_rank(LANGUAGE_LORA_TARGET),
        lora_vision=lora_per_rank(VISION_LORA_TARGET),
        layers=text.num_hidden_layers,
        hidden=text.hidden_size,
        kv_dim=text.num_key_value_heads * (text.hidden_size // text.num_attention_heads),
        intermediate=text.intermediate_size,
        vocab=text.vocab_size,
        vision_layers=vis.depth,
        vision_hidden=vis.hidden_size,
        vision_intermediate=vis.intermediate_size,
    )


def image_tokens_per_image(cfg: Config, override: int = 0) -> int:
    """Image tokens of one image at the configured pixel cap (one token per 28×28 pixels)."""
    if override:
        return override
    if cfg.model.max_pixels:
        return cfg.model.max_pixels // (28 * 28)
    path = Path(cfg.model.name_or_path)
    pre = (path if path.is_dir() else path.parent) / "preprocessor_config.json"
    if pre.is_file():
        p = json.loads(pre.read_text())
        return int(p.get("max_pixels") or p.get("size", {}).get("longest_edge", 12_845_056)) // (28 * 28)
    return 12_845_056 // (28 * 28)  # Qwen2.5-VL's own cap: 16,384 tokens


def layer_activation_bytes(hidden: int, kv: int, intermediate: int, c: int, r: int) -> int:
    """Bytes one token leaves saved for backward in one decoder (or vision) layer."""
    norms = 2 * (r + 4 + c) * hidden
    attention = c * (5 * hidden + 4 * kv)
    mlp = 4 * c * intermediate
    return norms + attention + mlp


def plan(
    cfg: Config, shape: ModelShape, gpus: int, gpu_memory: float, prompt_tokens: int = PROMPT_TEXT_TOKENS,
    image_tokens: int = 0,
) -> dict:  # fmt: skip
    """The per-rank memory plan (bytes) of ``cfg`` on ``gpus`` devices of ``gpu_memory`` bytes each."""
    m, g = cfg.model, cfg.grpo
    fsdp = cfg.train.strategy == "fsdp" and gpus > 1  # one process runs unsharded either way
    S = gpus if fsdp else 1
    bf16 = m.dtype == "bfloat16" or cfg.train.bf16
    c = 2 if bf16 else 4  # compute bytes
    d = 2 if m.dtype == "bfloat16" else 4  # storage bytes of frozen weights
    r = 2 if (fsdp and bf16) else 4  # residual stream: float32 masters under autocast, bf16 under FSDP
    lora = m.lora_rank > 0
    train_vision = not m.freeze_vision
    if lora:
        trainable = m.lora_rank * (shape.lora_language + (shape.lora_vision if train_vision else 0))
        frozen = shape.total
    else:
        trainable = shape.language + (shape.vision if train_vision else 0)
        frozen = shape.total - trainable

    images = 2 if cfg.data.kind == "hpdv2" else 1
    img_tok = image_tokens_per_image(cfg, image_tokens)
    L = prompt_tokens + images * img_tok  # prompt tokens with the images
    T, N = g.max_new_tokens, g.prompts_per_step * g.group_size
    M = min(g.minibatch_size, N)

    resident = {
        "weights": 4 * trainable / S,
        "gradients": 4 * trainable / S + (0 if fsdp or gpus == 1 else 4 * trainable),
        "optimizer": 8 * trainable / S,
        "frozen": d * frozen / S,
        "reference": d * shape.total / S if (not lora and g.kl_coef > 0) else 0,
    }

    # rollout: KV cache of every completion, the policy gathered once under FSDP
    kv_cache = 2 * shape.layers * shape.kv_dim * (L + T) * N * c
    gathered = c * shape.total if fsdp else 0
    # one minibatch of the update pass
    shared = g.share_prefix and not m.gradient_checkpointing
    prompts_in_mb = -(-M // g.group_size) if shared else M
    tokens = prompts_in_mb * L + M * T
    per_layer = layer_activation_bytes(shape.hidden, shape.kv_dim, shape.intermediate, c, r)
    act_full = shape.layers * per_layer * tokens
    act_ckpt = shape.layers * r * shape.hidden * tokens + per_layer * tokens
    if train_vision:
        patches = 4 * img_tok * images * prompts_in_mb
        v_layer = layer_activation_bytes(
            shape.vision_hidden, shape.vision_hidden, shape.vision_intermediate, c, 4
        )
        act_full += shape.vision_layers * v_layer * patches
        act_ckpt += shape.vision_layers * 4 * shape.vision_hidden * patches + v_layer * patches
    logits = LOGIT_BYTES * M * T * shape.vocab
    if fsdp:  # two gathered units in compute precision, one unit's unsharded float32 gradient
        compute_copy = (2 * c + 4) * shape.largest_unit
    else:
        compute_copy = 2 * trainable if bf16 else 0
    activations = act_ckpt if m.gradient_checkpointing else act_full
    phases = {
        "rollout": kv_cache + gathered,
        "reference": (c + 4 + 4) * M * T * shape.vocab + (2 * c * shape.largest_unit if fsdp else 0),
        "update": BACKWARD_FACTOR * activations + logits + compute_copy,
    }
    peak_phase = max(phases, key=phases.get)
    total = sum(resident.values()) + phases[peak_phase]
    usable = (1 - RESERVE) * gpu_memory
    return {
        "strategy": cfg.train.strategy if gpus > 1 else "single process",
        "gpus": gpus,
        "gpu_memory_bytes": int(gpu_memory),
        "usable_bytes": int(usable),
        "params": {"total": shape.total, "trainable": int(trainable), "frozen": int(frozen)},
        "tokens": {
            "prompt": L,
            "image_tokens_per_image": img_tok,
            "completion": T,
            "completions": N,
            "minibatch": M,
            "minibatch_tokens": tokens,
        },  # fmt: skip
        "resident_bytes": {k: int(v) for k, v in resident.items()},
        "transient_bytes": {
            "kv_cache": int(kv_cache),
            "gathered_policy": int(gathered),
            "activations": int(act_full),
            "activations_checkpointed": int(act_ckpt),
            "logits": int(logits),
            "compute_copy": int(compute_copy),
        },  # fmt: skip
        "phase_bytes": {k: int(v) for k, v in phases.items()},
        "peak_phase": peak_phase,
        "per_rank_bytes": int(total),
        "fits": bool(total <= usable),
    }


def knobs(cfg: Config, shape: ModelShape, gpus: int, gpu_memory: float, **kw) -> list[str]:
    """The single overrides (tried one at a time) under which the run fits."""
    tries = [("train", "strategy", "fsdp"), ("model", "gradient_checkpointing", True),
             ("grpo", "minibatch_size", 4), ("grpo", "minibatch_size", 2), ("model", "max_pixels", 200_704),
             ("model", "lora_rank", 64)]  # fmt: skip
    found = []
    for section, name, value in tries:
        if getattr(getattr(cfg, section), name) == value:
            continue
        changed = copy.deepcopy(cfg)
        setattr(getattr(changed, section), name, value)
        item = f"{section}.{name}={str(value).lower() if isinstance(value, bool) else value}"
        if name == "lora_rank" and cfg.train.strategy == "fsdp":  # LoRA runs under DDP (grpo.run.distributed)
            changed.train.strategy, item = "ddp", f"{item} train.strategy=ddp"
        if plan(changed, shape, gpus, gpu_memory, **kw)["fits"]:
            found.append(item)
    return found


def format_plan(p: dict) -> str:
    """The plan as a short table in GiB."""

    def gib(b):
        return f"{b / GiB:8.2f}"

    t, tr = p["tokens"], p["transient_bytes"]
    lines = [
        f"memory plan: {p['strategy']} on {p['gpus']} × {p['gpu_memory_bytes'] / GiB:.0f} GiB, "
        f"{p['params']['total'] / 1e9:.3f}B parameters ({p['params']['trainable'] / 1e9:.3f}B trainable); "
        f"prompt {t['prompt']} tokens ({t['image_tokens_per_image']} per image), T={t['completion']}, "
        f"N={t['completions']} completions, minibatch {t['minibatch']}",
        "  resident per rank (GiB):",
        *[f"    {k:<26}{gib(v)}" for k, v in p["resident_bytes"].items()],
        "  transient (GiB):",
        *[f"    {k:<26}{gib(v)}" for k, v in tr.items()],
        "  phases (GiB): " + ", ".join(f"{k} {v / GiB:.2f}" for k, v in p["phase_bytes"].items()),
        f"  per rank: {p['per_rank_bytes'] / GiB:.2f} GiB at the {p['peak_phase']} phase, "
        f"usable {p['usable_bytes'] / GiB:.2f} GiB: " + ("fits" if p["fits"] else "DOES NOT FIT"),
    ]
    if not p["fits"] and p.get("fewest_gpus"):
        lines.append(f"  fits on {p['fewest_gpus']} GPUs of this size and more")
    if not p["fits"] and p.get("knobs"):
        lines.append("  turn one of: " + ", ".join(p["knobs"]))
    elif not p["fits"] and tr["gathered_policy"] > p["usable_bytes"] / 2:
        lines.append(f"  no single knob is enough: sampling gathers the whole policy ({tr['gathered_policy'] / GiB:.1f} "
                     "GiB) on every rank, so more GPUs do not help; this model needs layer-wise sampling or a "
                     "separate inference engine (not implemented)")  # fmt: skip
    elif not p["fits"]:
        lines.append(
            "  no single knob is enough: more GPUs with train.strategy=fsdp, or several knobs at once"
        )
    return "\n".join(lines)


def device_memory(device: torch.device, local_ranks: int = 1) -> int:
    """Bytes one rank may use: the GPU's memory, or on CPU this host's RAM over its ranks."""
    if device.type == "cuda":
        return torch.cuda.get_device_properties(device).total_memory
    with open("/proc/meminfo") as fh:
        kib = next(int(line.split()[1]) for line in fh if line.startswith("MemTotal:"))
    return kib * 1024 // local_ranks


def fewest_gpus(cfg: Config, shape: ModelShape, gpu_memory: float, most: int = 1024, **kw) -> int | None:
    """The fewest ranks (up to ``most``) on which ``cfg`` fits, or None (under DDP more do not help)."""
    return next((w for w in range(1, most + 1) if plan(cfg, shape, w, gpu_memory, **kw)["fits"]), None)


def plan_for_config(cfg: Config, gpus: int, gpu_memory: float, download: bool = False, **kw) -> dict:
    """The plan of ``cfg``, with the knobs that would make it fit and the fewest GPUs it fits on, if it does not."""
    shape = model_shape(cfg.model.name_or_path, download)
    p = plan(cfg, shape, gpus, gpu_memory, **kw)
    if not p["fits"]:
        p["knobs"] = knobs(cfg, shape, gpus, gpu_memory, **kw)
        p["fewest_gpus"] = fewest_gpus(cfg, shape, gpu_memory, **kw)
    return p


def print_memory_plan(cfg: Config, world: int, device: torch.device, show: bool = True) -> dict:
    """The plan of this run on this hardware, printed (``show``) before training starts."""
    local = int(os.environ.get("LOCAL_WORLD_SIZE", "1"))
    p = plan_for_config(cfg, world, device_memory(device, local), download=True)
    if show:
        print(format_plan(p), file=sys.stderr)
    return p
