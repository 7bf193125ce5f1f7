"""Shared prefixes: a prompt (and its images) goes through the model once for many continuations.

GRPO samples G completions of one prompt and scores them twice (reference and update passes);
evaluation samples k rollouts of one request, and anchor ranking asks N − 1 questions that all
open with the same instructions and anchor image. ``generate(num_return_sequences=G)`` repeats
the prompt *before* the prefill, so the prompt and vision work grows with G. Here the prefix is
run once and its KV cache indexed to the rows that continue it (``index_select``: its backward
sums the rows in order, unlike advanced indexing, whose CPU backward races).

- ``sample_shared_prefix``: sampling, one prefill per prompt, the same draws as ``generate``.
- ``sample_shared_first_image``: pair requests that open with the same prompt and first image
  share the prefill of that opening; each runs its own second image and the rest on top.
- ``shared_prefix_logits``: the log-prob passes, differentiable, one prompt forward per group.

Qwen2.5-VL's 3-D rotary positions of a continuation are passed explicitly (``rope_positions``),
so the model's stateful ``rope_deltas`` never applies. Layers under gradient checkpointing drop
the cache (``kv_cache_available``); callers fall back to repeating the prompt rows. Shapes as in
``models.qwen_vl``; ``P`` distinct prompts, ``N`` continuations, ``K`` new tokens per call.
"""

from __future__ import annotations

import itertools

import torch
from transformers.cache_utils import DynamicLayer

from models.qwen_vl import (
    Completions,
    _hf_model,
    _trim,
    image_counts,
    sampling_config,
    suppressed_token_ids,
)


def rope_positions(model, inputs: dict[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    """Qwen2.5-VL's multimodal rotary positions of a left-padded prompt batch.

    Returns ``position_ids (3, B, L)`` (temporal, height, width; image tokens get 2-D grid
    positions, text tokens the same value thrice) and ``next_B (B,)``, the position of each
    row's first completion token: text after the prompt continues from the largest prompt
    position + 1 (``get_rope_index``'s ``rope_deltas`` is ``next − real length``). Passing
    positions explicitly keeps the model's own stateful ``rope_deltas`` out of the way.
    """
    position_ids, deltas_B1 = _hf_model(model).model.get_rope_index(
        inputs["input_ids"],
        mm_token_type_ids=inputs["mm_token_type_ids"],
        image_grid_thw=inputs.get("image_grid_thw"),
        attention_mask=inputs["attention_mask"],
    )
    next_B = inputs["attention_mask"].sum(dim=1) + deltas_B1.squeeze(1).to(inputs["attention_mask"].device)
    return position_ids, next_B


def prefill_shared(model, inputs: dict[str, torch.Tensor], rows_N: torch.Tensor):
    """Forward P prompt rows once and give completion ``n`` a view of prompt ``rows_N[n]``.

    Returns ``(cache, logits_NV, prompt_mask_NL, next_N)``: a ``DynamicCache`` whose per-layer
    keys/values are indexed to N rows on the batch dimension (differentiable, so gradients of all
    G completions flow back into their one prompt forward), the logits that predict the first
    completion token, the prompt attention mask and the first completion position per row.
    """
    position_ids, next_P = rope_positions(model, inputs)
    extra = {k: inputs[k] for k in ("pixel_values", "image_grid_thw") if k in inputs}
    out = model(
        input_ids=inputs["input_ids"],
        attention_mask=inputs["attention_mask"],
        mm_token_type_ids=inputs["mm_token_type_ids"],
        position_ids=position_ids,  # (3, P, L)
        use_cache=True,
        logits_to_keep=1,
        **extra,
    )
    cache = out.past_key_values
    # index_select, not keys[rows_N]: the backward of advanced indexing is index_put_(accumulate=True),
    # which on CPU (float32, > 1 thread) sums the G rows of one prompt with racing atomic adds, so a
    # minibatch that splits a group gave gradients that differ in the last bit from run to run.
    # index_select's backward (index_add_) sums them in row order, and is faster too.
    for layer in cache.layers:  # every layer: (P, kv_heads, L, d) → (N, kv_heads, L, d)
        layer.keys = layer.keys.index_select(0, rows_N)
        layer.values = layer.values.index_select(0, rows_N)
    first_NV = out.logits[:, -1].index_select(0, rows_N)  # (N, V)
    return cache, first_NV, inputs["attention_mask"][rows_N], next_P[rows_N]


def _decode(model, ids_NK: torch.Tensor, attention_mask: torch.Tensor, first_pos_N: torch.Tensor, cache):
    """Logits after K more tokens per row on top of ``cache``, ``(N, K, V)``; ``cache`` grows by K."""
    K = ids_NK.shape[1]
    pos_NK = first_pos_N[:, None] + torch.arange(K, device=ids_NK.device)  # (N, K): text positions
    out = model(
        input_ids=ids_NK,
        attention_mask=attention_mask,  # (N, L + cached + K)
        position_ids=pos_NK.unsqueeze(0).expand(3, -1, -1),  # (3, N, K)
        past_key_values=cache,
        use_cache=True,
    )
    return out.logits


class _InPlaceLayer(DynamicLayer):
    """A ``DynamicLayer`` whose keys/values live in a buffer reserved up front: each decode step
    writes one position in place instead of ``torch.cat``-ing a copy of the whole cache (measured:
    ~15% of the sampling time of the benchmark workload). For sampling only (no autograd)."""

    def __init__(self, layer: DynamicLayer, capacity: int):
        assert type(layer) is DynamicLayer, (
            f"expected full-attention cache layers, got {type(layer).__name__}"
        )
        super().__init__()
        N, heads, L, _ = layer.keys.shape
        self.dtype, self.device, self.is_initialized, self.length = layer.dtype, layer.device, True, L
        self.key_buf = layer.keys.new_empty(N, heads, capacity, layer.keys.shape[-1])  # (N, kv_heads, cap, d)
        self.value_buf = layer.values.new_empty(N, heads, capacity, layer.values.shape[-1])
        self.key_buf[:, :, :L], self.value_buf[:, :, :L] = layer.keys, layer.values
        self.keys, self.values = self.key_buf[:, :, :L], self.value_buf[:, :, :L]

    def update(self, key_states, value_states, *args, **kwargs):
        start, self.length = self.length, self.length + key_states.shape[-2]
        assert self.length <= self.key_buf.shape[2], "more tokens than the cache reserved"
        self.key_buf[:, :, start : self.length] = key_states
        self.value_buf[:, :, start : self.length] = value_states
        self.keys, self.values = self.key_buf[:, :, : self.length], self.value_buf[:, :, : self.length]
        return self.keys, self.values


@torch.no_grad()
def sample_shared_prefix(
    model,
    processor,
    inputs: dict[str, torch.Tensor],
    group_size: int,
    max_new_tokens: int,
    temperature: float = 1.0,
    min_new_tokens: int = 0,
    return_scores: bool = False,
) -> Completions | tuple[Completions, torch.Tensor]:
    """``sample_completions`` with one prefill per prompt, and a plain sampling loop.

    The loop does what ``generate`` does with ``sampling_config``: softmax of logits /
    temperature over the full vocabulary (top_k=0, top_p=1), vision special tokens suppressed,
    end-of-sequence suppressed before ``min_new_tokens``, finished rows padded, stop when every
    row has ended. ``return_scores`` returns the raw logits of each step, ``(N, T, V)``.
    """
    B = inputs["input_ids"].shape[0]
    rows_N = torch.arange(B, device=inputs["input_ids"].device).repeat_interleave(group_size)  # n → n // G
    cache, logits_NV, attention_mask, next_N = prefill_shared(model, inputs, rows_N)
    return _sample_from_cache(model, processor, cache, logits_NV, attention_mask, next_N, max_new_tokens,
                              temperature, min_new_tokens, return_scores)  # fmt: skip


def _sample_from_cache(
    model, processor, cache, logits_NV, attention_mask, next_N, max_new_tokens, temperature, min_new_tokens,
    return_scores,
) -> Completions | tuple[Completions, torch.Tensor]:  # fmt: skip
    """The sampling loop of ``sample_shared_prefix`` on top of a prefilled ``cache`` of N rows.

    ``logits_NV`` predict the first completion token, ``attention_mask (N, L)`` covers the cached
    prompt columns and ``next_N`` is each row's first completion position (``rope_positions``).
    """
    device = logits_NV.device
    eos_ids = sampling_config(model, processor, 1, temperature).eos_token_id
    eos = torch.tensor(eos_ids, device=device)
    suppressed = torch.tensor(suppressed_token_ids(processor), device=device)
    pad = processor.tokenizer.pad_token_id

    L = attention_mask.shape[1]
    cache.layers = [_InPlaceLayer(layer, L + max_new_tokens) for layer in cache.layers]
    done_N = torch.zeros(logits_NV.shape[0], dtype=torch.bool, device=device)
    tokens, raw = [], []
    for t in range(max_new_tokens):
        if t > 0:
            attention_mask = torch.cat([attention_mask, torch.ones_like(attention_mask[:, :1])], dim=1)
            logits_NV = _decode(model, tokens[-1][:, None], attention_mask, next_N + t - 1, cache)[:, -1]
        if return_scores:
            raw.append(logits_NV)
        scores_NV = logits_NV.float() / temperature
        scores_NV[:, suppressed] = -torch.inf
        if t < min_new_tokens:
            scores_NV[:, eos] = -torch.inf
        token_N = torch.multinomial(torch.softmax(scores_NV, dim=-1), 1).squeeze(1)
        token_N = token_N.masked_fill(done_N, pad)  # rows that have ended only carry padding
        tokens.append(token_N)
        done_N |= torch.isin(token_N, eos)
        if done_N.all():
            break
    completions = _trim(torch.stack(tokens, dim=1), processor, eos_ids, max_new_tokens)  # (N, T)
    if return_scores:
        return completions, torch.stack(raw, dim=1)  # (N, T, V)
    return completions


def kv_cache_available(model) -> bool:
    """Whether a forward keeps its KV cache: layers under gradient checkpointing in training mode drop it."""
    layers = _hf_model(model).model.language_model.layers
    return not any(layer.gradient_checkpointing and layer.training for layer in layers)


# ---------------------------------------------------------------------------------------------
# Shared first image: the anchor method's N − 1 comparisons [anchor, j] of one prompt


@torch.no_grad()
def sample_shared_first_image(
    model,
    processor,
    inputs: dict[str, torch.Tensor],
    group_size: int,
    max_new_tokens: int,
    temperature: float = 1.0,
    min_new_tokens: int = 0,
    return_scores: bool = False,
) -> Completions | tuple[Completions, torch.Tensor]:
    """``sample_completions`` where prompts that open alike share one prefill of their opening.

    A prompt's *prefix* is its tokens up to and including its first image block, with that
    image. The anchor method's comparisons ``[anchor, j]`` of one prompt all render as
    ``[instructions ‖ anchor image | image j ‖ rest]``: one prefix, N − 1 *suffixes*. Three
    forwards instead of one over B full prompts:

    1. the P distinct prefixes, left padded, with their first images (the vision tower sees each
       anchor once);
    2. that cache indexed to the B prompt rows (``index_select``), then every row's suffix (its
       other images and the rest of its prompt), left padded *between* prefix and suffix, so that
       every row's last column is real and a padding query still attends to its prefix;
    3. the cache indexed to the N = B·G completion rows and ``sample_shared_prefix``'s loop.

    Positions are those of the unsplit prompt (``rope_positions`` on the full batch), passed
    explicitly: same distribution as ``sample_completions``, and with the same seed the same
    tokens. A row whose prefix no other row shares (a swapped comparison ``[j, anchor]``) is a
    prefix of its own: correct, only not cheaper. Needs a KV cache (no gradient checkpointing).
    """
    ids, mask, mm = inputs["input_ids"], inputs["attention_mask"], inputs["mm_token_type_ids"]
    B, L = ids.shape
    device = ids.device
    position_ids, next_B = rope_positions(model, inputs)  # (3, B, L), (B,)
    counts = image_counts(inputs)
    assert min(counts) >= 1, "every prompt needs an image to split after"
    grid = inputs["image_grid_thw"]  # (I, 3)
    first_image = [0, *itertools.accumulate(counts)]  # (B+1,) image index of row b's first image
    patch_start = [0, *itertools.accumulate(grid.prod(dim=1).tolist())]  # (I+1,) packed patch rows

    def patches(i: int) -> torch.Tensor:  # image i's rows of pixel_values
        return inputs["pixel_values"][patch_start[i] : patch_start[i + 1]]

    # Row b's real tokens are [start, L) (left padding); its prefix is [start, split).
    vision_end = processor.tokenizer.convert_tokens_to_ids("<|vision_end|>")
    start_B = (L - mask.sum(dim=1)).tolist()
    split_B = []
    for b in range(B):
        assert mask[b, start_B[b] :].all(), "prompts must be left padded"
        image_cols = (mm[b] == 1).nonzero().squeeze(1)
        after = image_cols[0] + (mm[b, image_cols[0] :] != 1).nonzero()[0, 0]  # first column after the block
        assert ids[b, after] == vision_end, "an image block ends with <|vision_end|>"
        split_B.append(int(after) + 1)

    # Rows with the same prefix tokens and the same first image share one prefix row.
    reps: list[int] = []  # (P,) the first row of each distinct prefix
    prefix_B = []  # (B,) prefix row of each prompt row
    for b in range(B):
        for p, r in enumerate(reps):
            if (split_B[b] - start_B[b] == split_B[r] - start_B[r]
                    and torch.equal(ids[b, start_B[b] : split_B[b]], ids[r, start_B[r] : split_B[r]])
                    and torch.equal(grid[first_image[b]], grid[first_image[r]])
                    and torch.equal(patches(first_image[b]), patches(first_image[r]))):  # fmt: skip
                prefix_B.append(p)
                break
        else:
            prefix_B.append(len(reps))
            reps.append(b)
    prefix_B = torch.tensor(prefix_B, device=device)

    def right_aligned(rows: list[int], cols: list[slice]) -> dict[str, torch.Tensor]:
        """Token columns ``cols[i]`` of row ``rows[i]``, left padded to one width."""
        width = max(c.stop - c.start for c in cols)
        out = dict(
            input_ids=ids.new_full((len(rows), width), processor.tokenizer.pad_token_id),
            attention_mask=mask.new_zeros(len(rows), width),
            mm_token_type_ids=mm.new_zeros(len(rows), width),
            position_ids=position_ids.new_ones(3, len(rows), width),  # (3, R, W); padding: any value
        )
        for i, (b, c) in enumerate(zip(rows, cols)):
            n = c.stop - c.start
            out["input_ids"][i, width - n :] = ids[b, c]
            out["attention_mask"][i, width - n :] = 1
            out["mm_token_type_ids"][i, width - n :] = mm[b, c]
            out["position_ids"][:, i, width - n :] = position_ids[:, b, c]
        return out

    # 1. The P prefixes and their first images.
    prefix = right_aligned(reps, [slice(start_B[r], split_B[r]) for r in reps])
    firsts = [first_image[r] for r in reps]
    out = model(**prefix, pixel_values=torch.cat([patches(i) for i in firsts]), image_grid_thw=grid[firsts],
                use_cache=True, logits_to_keep=1)  # fmt: skip
    cache = out.past_key_values
    # index_select, not keys[prefix_B]: see prefill_shared.
    for layer in cache.layers:  # (P, kv_heads, Lp, d) → (B, kv_heads, Lp, d)
        layer.keys = layer.keys.index_select(0, prefix_B)
        layer.values = layer.values.index_select(0, prefix_B)

    # 2. Every row's suffix on top of its prefix.
    suffix = right_aligned(list(range(B)), [slice(split_B[b], L) for b in range(B)])
    others = [i for b in range(B) for i in range(first_image[b] + 1, first_image[b + 1])]
    extra = {}
    if others:  # pair prompts: the second image of every row
        extra = dict(pixel_values=torch.cat([patches(i) for i in others]), image_grid_thw=grid[others])
    attention_mask = torch.cat([prefix["attention_mask"].index_select(0, prefix_B), suffix["attention_mask"]],
                               dim=1)  # (B, Lp + Ls)  # fmt: skip
    out = model(**{**suffix, "attention_mask": attention_mask}, past_key_values=cache, use_cache=True,
                logits_to_keep=1, **extra)  # fmt: skip
    logits_BV = out.logits[:, -1]

    # 3. G completions per prompt row.
    rows_N = torch.arange(B, device=device).repeat_interleave(group_size)  # completion n → prompt n // G
    for layer in cache.layers:  # (B, …) → (N, …)
        layer.keys = layer.keys.index_select(0, rows_N)
        layer.values = layer.values.index_select(0, rows_N)
    return _sample_from_cache(model, processor, cache, logits_BV.index_select(0, rows_N),
                              attention_mask.index_select(0, rows_N), next_B.index_select(0, rows_N),
                              max_new_tokens, temperature, min_new_tokens, return_scores)  # fmt: skip


def shared_prefix_logits(model, inputs, ids_NT, mask_NT, temperature, prompt_rows) -> torch.Tensor:
    """``completion_logits`` with one forward per distinct prompt (see ``prefill_shared``)."""
    rows_N = torch.as_tensor(prompt_rows, dtype=torch.long, device=ids_NT.device)
    cache, first_NV, prompt_mask, next_N = prefill_shared(model, inputs, rows_N)
    logits = [first_NV[:, None]]  # (N, 1, V): predicts completion token 0
    if ids_NT.shape[1] > 1:  # tokens 0 … T−2 predict tokens 1 … T−1
        attention_mask = torch.cat([prompt_mask, mask_NT[:, :-1].to(prompt_mask)], dim=1)
        logits.append(_decode(model, ids_NT[:, :-1], attention_mask, next_N, cache))
    return torch.cat(logits, dim=1).float() / temperature  # (N, T, V)
