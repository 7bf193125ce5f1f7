"""Shared prefixes: a prompt (and its images) goes through the model once for many continuations.

GRPO samples G completions of one prompt and scores them twice (reference and update passes);
evaluation samples k rollouts of one request. ``generate(num_return_sequences=G)`` repeats the
prompt *before* the prefill, so the prompt and vision work grows with G. Here the prompt is run
once (``prefill_prompts``) and its keys/values are given to the N rows that continue it. This file
holds the pieces that ``models.sampling`` (no gradients, a cache that grows by one token a step)
and ``models.logprobs`` (gradients, one forward over all completion tokens) share:

- ``rope_positions``: Qwen2.5-VL's 3-D rotary positions of a prompt batch, passed explicitly so
  the model's stateful ``rope_deltas`` never applies;
- ``prefill_prompts``: the P prompts once, keys/values of every layer kept (P rows);
- ``PrefixLayer``: a read-only cache layer that hands the prompt's keys/values, indexed to the N
  continuation rows, to a forward over completion tokens (differentiable: the gradients of all G
  completions flow back into their one prompt forward);
- ``GrowingLayer``: a cache layer with room reserved for the sampled tokens (sampling only);
- ``decode``: a forward over K more tokens per row on top of a cache.

**Activation checkpointing.** Transformers drops any cache inside checkpointed layers, because a
cache that grows would grow a second time when the backward replays the layer. Our two cache
layers of the differentiable path never grow: ``PromptLayer`` only records the keys/values it is
given (a replay records the same values again) and ``PrefixLayer`` only reads. So under
checkpointing the layers may keep them (``cache_kept_under_checkpointing``) and prefix sharing
composes with checkpointing: each layer of the prompt forward and of the completion forward is
recomputed in the backward from its input alone.

Shapes as in ``models.qwen_vl``; ``P`` distinct prompts, ``N`` continuations, ``K`` new tokens per call.
"""

from __future__ import annotations

from contextlib import contextmanager

import torch
from transformers.cache_utils import Cache, DynamicLayer

from models.qwen_vl import unwrap


def rope_positions(model, inputs: dict[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    """Qwen2.5-VL's multimodal rotary positions of a left-padded prompt batch.

    Returns ``position_ids (3, B, L)`` (temporal, height, width; image tokens get 2-D grid
    positions, text tokens the same value thrice) and ``next_B (B,)``, the position of each
    row's first completion token: text after the prompt continues from the largest prompt
    position + 1 (``get_rope_index``'s ``rope_deltas`` is ``next − real length``). Passing
    positions explicitly keeps the model's own stateful ``rope_deltas`` out of the way.
    """
    position_ids, deltas_B1 = unwrap(model).model.get_rope_index(
        inputs["input_ids"],
        mm_token_type_ids=inputs["mm_token_type_ids"],
        image_grid_thw=inputs.get("image_grid_thw"),
        attention_mask=inputs["attention_mask"],
    )
    next_B = inputs["attention_mask"].sum(dim=1) + deltas_B1.squeeze(1).to(inputs["attention_mask"].device)
    return position_ids, next_B


# --------------------------------------------------------------------------------- cache layers


class PromptLayer(DynamicLayer):
    """Records the prompt's keys/values of one layer. A replay (activation checkpointing) records
    the recomputed, equal values again instead of appending them."""

    def update(self, key_states, value_states, *args, **kwargs):
        if not self.is_initialized:
            self.lazy_initialization(key_states, value_states)
        self.keys, self.values = key_states, value_states  # (P, kv_heads, L, d)
        return self.keys, self.values


class PrefixLayer(DynamicLayer):
    """The prompt's keys/values ``(P, kv_heads, L, d)`` seen by N continuation rows, read only.

    ``update`` returns ``[prompt ‖ new]`` with the prompt indexed to the rows (``index_select``,
    not ``keys[rows_N]``: the backward of advanced indexing is ``index_put_(accumulate=True)``,
    which on CPU sums the G rows of one prompt with racing atomic adds, so gradients differed in the
    last bit from run to run; ``index_select``'s backward sums them in row order) and stores
    nothing, so a checkpointed layer can replay it.
    """

    def __init__(self, keys_P: torch.Tensor, values_P: torch.Tensor, rows_N: torch.Tensor):
        super().__init__()
        self.dtype, self.device, self.is_initialized = keys_P.dtype, keys_P.device, True
        self.keys, self.values, self.rows_N = keys_P, values_P, rows_N  # get_seq_length() = L

    def update(self, key_states, value_states, *args, **kwargs):
        keys = torch.cat(
            [self.keys.index_select(0, self.rows_N), key_states], dim=-2
        )  # (N, kv_heads, L+K, d)
        values = torch.cat([self.values.index_select(0, self.rows_N), value_states], dim=-2)
        return keys, values


class GrowingLayer(DynamicLayer):
    """Keys/values in a buffer reserved up front for ``capacity`` positions: each decode step
    writes one position in place instead of ``torch.cat``-ing a copy of the whole cache (measured:
    ~15% of the sampling time of the benchmark workload). For sampling only (no autograd)."""

    def __init__(self, keys_N: torch.Tensor, values_N: torch.Tensor, capacity: int):
        super().__init__()
        N, heads, L, d = keys_N.shape
        self.dtype, self.device, self.is_initialized, self.length = keys_N.dtype, keys_N.device, True, L
        self.key_buf = keys_N.new_empty(N, heads, capacity, d)  # (N, kv_heads, cap, d)
        self.value_buf = values_N.new_empty(N, heads, capacity, values_N.shape[-1])
        self.key_buf[:, :, :L], self.value_buf[:, :, :L] = keys_N, values_N
        self.keys, self.values = self.key_buf[:, :, :L], self.value_buf[:, :, :L]

    def update(self, key_states, value_states, *args, **kwargs):
        start, self.length = self.length, self.length + key_states.shape[-2]
        assert self.length <= self.key_buf.shape[2], "more tokens than the cache reserved"
        self.key_buf[:, :, start : self.length] = key_states
        self.value_buf[:, :, start : self.length] = value_states
        self.keys, self.values = self.key_buf[:, :, : self.length], self.value_buf[:, :, : self.length]
        return self.keys, self.values


@contextmanager
def cache_kept_under_checkpointing(model):
    """Let checkpointed decoder layers use our cache layers (see the module docstring): transformers'
    ``_can_checkpoint_with_cache``, set on the layers for the duration of the block."""
    layers = unwrap(model).model.language_model.layers
    for layer in layers:
        layer._can_checkpoint_with_cache = True
    try:
        yield
    finally:
        for layer in layers:
            del layer._can_checkpoint_with_cache


def kv_cache_available(model) -> bool:
    """Whether a plain forward keeps its KV cache: layers under gradient checkpointing in training
    mode drop it (outside ``cache_kept_under_checkpointing``)."""
    layers = unwrap(model).model.language_model.layers
    return not any(layer.gradient_checkpointing and layer.training for layer in layers)


# ------------------------------------------------------------------------------------- forwards


def prefill_prompts(model, inputs: dict[str, torch.Tensor]):
    """Forward P prompt rows (with their images) once, keeping every layer's keys/values.

    Returns ``(kv, last_P, next_P)``: per layer ``(keys, values)`` of shape ``(P, kv_heads, L, d)``,
    the model's output at each prompt's last position ``(P, ·)`` (the logits that predict the first
    completion token, or the hidden state when the LM head is off, ``models.logprobs``) and each
    row's first completion position (``rope_positions``). Call it inside
    ``cache_kept_under_checkpointing`` when the model may be checkpointed.
    """
    position_ids, next_P = rope_positions(model, inputs)
    cache = Cache(layers=[PromptLayer() for _ in unwrap(model).model.language_model.layers])
    extra = {k: inputs[k] for k in ("pixel_values", "image_grid_thw") if k in inputs}
    out = model(
        input_ids=inputs["input_ids"],
        attention_mask=inputs["attention_mask"],
        mm_token_type_ids=inputs["mm_token_type_ids"],
        position_ids=position_ids,  # (3, P, L)
        past_key_values=cache,
        use_cache=True,
        logits_to_keep=1,
        **extra,
    )
    kv = [(layer.keys, layer.values) for layer in cache.layers]
    return kv, out.logits[:, -1], next_P


def prefill_shared(model, inputs: dict[str, torch.Tensor], rows_N: torch.Tensor):
    """Forward P prompt rows once and give continuation ``n`` a view of prompt ``rows_N[n]``.

    Returns ``(cache, first_N, prompt_mask_NL, next_N)``: a cache of ``PrefixLayer``s, the model's
    output that predicts the first completion token of each row, the prompt attention mask and the
    first completion position per row.
    """
    kv, last_P, next_P = prefill_prompts(model, inputs)
    cache = Cache(layers=[PrefixLayer(k, v, rows_N) for k, v in kv])
    return cache, last_P.index_select(0, rows_N), inputs["attention_mask"][rows_N], next_P[rows_N]


def decode(model, ids_NK: torch.Tensor, attention_mask: torch.Tensor, first_pos_N: torch.Tensor, cache):
    """The model's output after K more tokens per row on top of ``cache``, ``(N, K, ·)``.

    ``attention_mask (N, cached + K)`` covers the cached columns and the new ones; the new tokens
    are text, at positions ``first_pos_N + 0 … K−1`` on all three rotary axes.
    """
    K = ids_NK.shape[1]
    pos_NK = first_pos_N[:, None] + torch.arange(K, device=ids_NK.device)  # (N, K): text positions
    out = model(
        input_ids=ids_NK,
        attention_mask=attention_mask,
        position_ids=pos_NK.unsqueeze(0).expand(3, -1, -1),  # (3, N, K)
        past_key_values=cache,
        use_cache=True,
    )
    return out.logits
