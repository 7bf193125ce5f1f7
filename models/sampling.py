"""Sampling G completions per prompt: ``generate`` or our own loop on a shared prompt prefill.

- ``sample_completions``: G completions of each of B prompts, flattened to N = B·G rows; with
  ``share_prefix`` each prompt is prefilled once (``models.kv_cache``) and a plain sampling loop
  continues its G rows (``sample_shared_prefix``): the same distribution as ``generate``.
- ``draw_tokens``: one token per row by inverse CDF, the draw of our loop. ``generate``'s
  ``torch.multinomial`` draws one exponential variate per vocabulary entry (V = 152,064 of them per
  row and step); inverse CDF draws one uniform per row. ``draw_tokens_as_generate`` is
  ``generate``'s draw: with it our loop samples, seed for seed, the tokens ``generate`` samples,
  which is how the tests hold the loop to ``generate``.
- ``sample_shared_first_image``: pair requests that open with the same prompt and first image
  (anchor ranking) share the prefill of that opening.

Facts this module relies on (docs/facts.md, measured with transformers 5.23): sampling suppresses
the vision special tokens (a random model may sample ``<|image_pad|>``, and the re-forward then
fails) and uses ``top_k=0, top_p=1.0`` so that the distribution we sample from is the one we
score; the checkpoint's ``generation_config.json`` is hidden from ``generate``.

Shapes as in ``models.qwen_vl``; ``N = B·G`` completions, ``T`` completion tokens.
"""

from __future__ import annotations

import itertools
from collections.abc import Callable
from contextlib import contextmanager
from dataclasses import dataclass

import torch
from transformers import GenerationConfig
from transformers.cache_utils import Cache

from common.config import SamplingSpec
from models.kv_cache import GrowingLayer, decode, prefill_prompts, rope_positions
from models.qwen_vl import group_rows, image_counts, unwrap, vision_token_ids


@dataclass
class Completions:
    """``G`` sampled completions for each of ``B`` prompts, flattened to ``N = B·G`` rows.

    Row ``n`` belongs to prompt ``n // G``. ``ids_NT`` is right padded with the pad token and
    ``mask_NT`` is 1 on real tokens (the end-of-turn token included, which is also scored).
    """

    ids_NT: torch.Tensor
    mask_NT: torch.Tensor
    texts: list[str]
    truncated_N: torch.Tensor  # True where the completion hit max_new_tokens without ending


def at_temperature(logits: torch.Tensor, temperature: float, in_place: bool = False) -> torch.Tensor:
    """``logits / τ``: the one place the temperature enters a distribution, for sampling and for the
    log-probs that score what was sampled. τ = 1 leaves the logits as they are."""
    if temperature == 1.0:
        return logits
    return logits.div_(temperature) if in_place else logits / temperature


def sampling_config(model, processor, max_new_tokens: int, temperature: float, min_new_tokens: int = 0):
    """The generation settings GRPO needs: plain sampling from the full softmax at ``temperature``.

    Every field that shapes the sampling distribution is set here, to its neutral value. The
    checkpoint's ``generation_config.json`` must not leak in: ``generate()`` fills every field
    left unset from it, and Qwen2.5-VL-7B-Instruct's sets ``repetition_penalty`` 1.05 and
    ``temperature`` 1e-6, while GRPO scores the unpenalised softmax. Only the end-of-sequence ids
    come from the checkpoint. ``sample_completions`` also hides the checkpoint's config from
    ``generate()`` altogether (``neutral_generation_defaults``).
    """
    gen = unwrap(model).generation_config
    eos = gen.eos_token_id if isinstance(gen.eos_token_id, list) else [gen.eos_token_id]
    return GenerationConfig(
        do_sample=True,
        num_beams=1,
        temperature=temperature,
        top_k=0,
        top_p=1.0,
        typical_p=1.0,
        epsilon_cutoff=0.0,
        eta_cutoff=0.0,
        repetition_penalty=1.0,
        encoder_repetition_penalty=1.0,
        no_repeat_ngram_size=0,
        encoder_no_repeat_ngram_size=0,
        renormalize_logits=False,
        remove_invalid_values=False,
        max_new_tokens=max_new_tokens,
        min_new_tokens=min_new_tokens,
        eos_token_id=eos,
        pad_token_id=processor.tokenizer.pad_token_id,
        suppress_tokens=vision_token_ids(model),
        num_return_sequences=1,
    )


@contextmanager
def neutral_generation_defaults(model):
    """Hide the checkpoint's generation config from ``generate()`` while sampling.

    ``generate()`` fills each field of the config it is given that is still ``None`` from
    ``model.generation_config`` (``min_p``, ``sequence_bias``, ``bad_words_ids``, … beyond the ones
    ``sampling_config`` sets). An empty config in its place leaves only transformers' neutral
    defaults, so no field of any ``generation_config.json`` changes what we sample.
    """
    hf = unwrap(model)
    saved, hf.generation_config = hf.generation_config, GenerationConfig()
    try:
        yield
    finally:
        hf.generation_config = saved


def draw_tokens(scores_NV: torch.Tensor) -> torch.Tensor:
    """One token per row from ``softmax(scores_NV)``, by inverse CDF; ``scores_NV`` is overwritten.

    ``w = exp(s − max s)`` (a −∞ score gets weight 0), ``c`` its running sum along the vocabulary,
    ``u`` uniform on ``[0, c_V)`` per row: the token is the first ``i`` with ``c_i > u``, drawn
    with probability ``w_i / c_V``. A weight-0 token never is (its ``c_i`` equals its
    predecessor's). Cost per row: V additions and one random number, where ``torch.multinomial``
    draws V exponential variates (Gumbel-max); at V = 152,064 those took 75 of every 98 ms of a
    sampling step (``BENCHMARKS.md``). Precision: ``cumsum`` on CPU accumulates float32 in double,
    so each ``c_i`` carries one rounding (2^-24 relative), about the resolution of the uniform.
    """
    u_N1 = torch.rand((scores_NV.shape[0], 1), device=scores_NV.device)
    return inverse_cdf(scores_NV, u_N1)


def inverse_cdf(scores_NV: torch.Tensor, u_N1: torch.Tensor) -> torch.Tensor:
    """The token of each row at uniform ``u_N1`` in [0, 1) (see ``draw_tokens``); overwrites ``scores_NV``."""
    weights_NV = scores_NV.sub_(scores_NV.amax(dim=-1, keepdim=True)).exp_()
    cdf_NV = torch.cumsum(weights_NV, dim=-1, out=weights_NV)  # in place: one (N, V) buffer in all
    total_N1 = cdf_NV[:, -1:]
    below_N1 = torch.nextafter(total_N1, torch.zeros_like(total_N1))  # u·c_V may round up to c_V
    u_N1 = torch.minimum(u_N1 * total_N1, below_N1)
    return torch.searchsorted(cdf_NV, u_N1, right=True).squeeze(1)


def draw_tokens_per_row(seeds_N: list[int]) -> Callable[[torch.Tensor], torch.Tensor]:
    """``draw_tokens`` with row n's uniforms from a generator of its own, seeded ``seeds_N[n]``.

    A row's tokens then depend only on its seed and its own logits, not on which other rows share
    the batch or in what order (the per-item determinism of ``eval.batch``). One ``torch.rand``
    call per row and step, on the CPU: negligible beside a decoding step.
    """
    generators = [torch.Generator().manual_seed(int(s)) for s in seeds_N]

    def draw(scores_NV: torch.Tensor) -> torch.Tensor:
        assert scores_NV.shape[0] == len(generators), f"{scores_NV.shape[0]} rows, {len(generators)} seeds"
        u_N1 = torch.cat([torch.rand(1, generator=g) for g in generators])[:, None]
        return inverse_cdf(scores_NV, u_N1.to(scores_NV.device))

    return draw


def draw_tokens_as_generate(scores_NV: torch.Tensor) -> torch.Tensor:
    """``generate``'s draw, ``torch.multinomial(softmax(scores_NV), 1)``: the same distribution as
    ``draw_tokens``, other random numbers. With it our loop reproduces ``generate`` seed for seed."""
    return torch.multinomial(torch.softmax(scores_NV, dim=-1), 1).squeeze(1)


@torch.no_grad()
def sample_completions(
    model,
    processor,
    inputs: dict[str, torch.Tensor],
    group_size: int,
    max_new_tokens: int,
    temperature: float = SamplingSpec.temperature,
    min_new_tokens: int = 0,
    return_scores: bool = False,
    share_prefix: bool = SamplingSpec.share_prefix,
    draw: Callable[[torch.Tensor], torch.Tensor] = draw_tokens,
) -> Completions | tuple[Completions, torch.Tensor]:
    """Sample ``group_size`` completions per prompt.

    With ``share_prefix`` (the default, ``SamplingSpec.share_prefix``, what training and
    evaluation run) each prompt (with its images) is prefilled once and its KV cache shared by
    its G completions (``sample_shared_prefix``, whose loop draws with ``draw``): same
    distribution, the prompt's cost no longer grows with G. Without it, one batched ``generate``
    call, which repeats every prompt G times *before* the prefill: the reference the tests hold
    our loop to.

    With ``return_scores`` the raw logits of each step come back too, ``(N, T, V)``, which the
    tests compare with our re-forward log-probs.
    """
    if share_prefix:
        return sample_shared_prefix(model, processor, inputs, group_size, max_new_tokens, temperature,
                                    min_new_tokens, return_scores, draw)  # fmt: skip
    cfg = sampling_config(model, processor, max_new_tokens, temperature, min_new_tokens)
    cfg.num_return_sequences = group_size
    L = inputs["input_ids"].shape[1]
    cfg.return_dict_in_generate = True
    cfg.output_logits = return_scores
    with neutral_generation_defaults(model):
        out = model.generate(**inputs, generation_config=cfg)
    ids_NT = out.sequences[:, L:]  # (N, T)
    completions = _trim(ids_NT, processor, cfg.eos_token_id, max_new_tokens)
    if return_scores:
        return completions, torch.stack(out.logits, dim=1)  # (N, T, V)
    return completions


def _trim(ids_NT: torch.Tensor, processor, eos_ids: list[int], max_new_tokens: int) -> Completions:
    """Mask everything after the first end-of-sequence token (which itself stays unmasked)."""
    is_eos = torch.isin(ids_NT, torch.tensor(eos_ids, device=ids_NT.device))
    # A token is real if no eos came strictly before it.
    eos_before = (is_eos.cumsum(dim=1) - is_eos.long()) > 0
    mask_NT = (~eos_before).long()
    ended = is_eos.any(dim=1)
    pad = processor.tokenizer.pad_token_id
    ids_NT = ids_NT.masked_fill(mask_NT == 0, pad)
    texts = processor.tokenizer.batch_decode(ids_NT, skip_special_tokens=True)
    truncated = ~ended & (ids_NT.shape[1] >= max_new_tokens)
    return Completions(ids_NT=ids_NT, mask_NT=mask_NT, texts=texts, truncated_N=truncated)


@torch.no_grad()
def sample_shared_prefix(
    model,
    processor,
    inputs: dict[str, torch.Tensor],
    group_size: int,
    max_new_tokens: int,
    temperature: float = SamplingSpec.temperature,
    min_new_tokens: int = 0,
    return_scores: bool = False,
    draw: Callable[[torch.Tensor], torch.Tensor] = draw_tokens,
) -> Completions | tuple[Completions, torch.Tensor]:
    """``sample_completions`` with one prefill per prompt, and a plain sampling loop.

    The loop does what ``generate`` does with ``sampling_config``: softmax of logits /
    temperature over the full vocabulary (top_k=0, top_p=1), vision special tokens suppressed,
    end-of-sequence suppressed before ``min_new_tokens``, finished rows padded, stop when every
    row has ended. Each step's tokens come from ``draw`` (``draw_tokens``; with
    ``draw_tokens_as_generate``, the tokens ``generate`` draws with the same seed).
    ``return_scores`` returns the raw logits of each step, ``(N, T, V)``.
    """
    B = inputs["input_ids"].shape[0]
    rows_N = group_rows(B, group_size, inputs["input_ids"].device)  # (N,)
    kv, logits_BV, next_B = prefill_prompts(model, inputs)
    return _sample_from_cache(model, processor, kv, rows_N, logits_BV, inputs["attention_mask"], next_B,
                              max_new_tokens, temperature, min_new_tokens, return_scores, draw)  # fmt: skip


def _sample_from_cache(
    model, processor, kv, rows_N, logits_BV, attention_mask, next_B, max_new_tokens, temperature, min_new_tokens,
    return_scores, draw,
) -> Completions | tuple[Completions, torch.Tensor]:  # fmt: skip
    """The sampling loop of ``sample_shared_prefix`` on top of B prefilled prompt rows.

    ``kv`` holds every layer's prompt keys/values ``(B, kv_heads, L, d)``, completion ``n``
    continues prompt row ``rows_N[n]``, ``logits_BV`` predict the first completion token,
    ``attention_mask (B, L)`` covers the prompt columns and ``next_B`` is each row's first
    completion position (``rope_positions``).
    """
    logits_NV = logits_BV.index_select(0, rows_N)
    attention_mask, next_N = attention_mask.index_select(0, rows_N), next_B.index_select(0, rows_N)
    L = attention_mask.shape[1]
    cache = Cache(layers=[GrowingLayer(k.index_select(0, rows_N), v.index_select(0, rows_N), L + max_new_tokens)
                          for k, v in kv])  # fmt: skip
    device = logits_NV.device
    eos_ids = sampling_config(model, processor, 1, temperature).eos_token_id
    eos = torch.tensor(eos_ids, device=device)
    suppressed = torch.tensor(vision_token_ids(model), device=device)
    pad = processor.tokenizer.pad_token_id

    done_N = torch.zeros(logits_NV.shape[0], dtype=torch.bool, device=device)
    tokens, raw = [], []
    for t in range(max_new_tokens):
        if t > 0:
            attention_mask = torch.cat([attention_mask, torch.ones_like(attention_mask[:, :1])], dim=1)
            logits_NV = decode(model, tokens[-1][:, None], attention_mask, next_N + t - 1, cache)[:, -1]
        if return_scores:
            raw.append(logits_NV.clone())
        scores_NV = logits_NV.float()  # the step's own logits: scaled and masked in place
        at_temperature(scores_NV, temperature, in_place=True)
        scores_NV[:, suppressed] = -torch.inf
        if t < min_new_tokens:
            scores_NV[:, eos] = -torch.inf
        token_N = draw(scores_NV)
        token_N = token_N.masked_fill(done_N, pad)  # rows that have ended only carry padding
        tokens.append(token_N)
        done_N |= torch.isin(token_N, eos)
        if done_N.all():
            break
    completions = _trim(torch.stack(tokens, dim=1), processor, eos_ids, max_new_tokens)  # (N, T)
    if return_scores:
        return completions, torch.stack(raw, dim=1)  # (N, T, V)
    return completions


# ---------------------------------------------------------------------------------------------
# Shared first image: the anchor method's N − 1 comparisons [anchor, j] of one prompt


@torch.no_grad()
def sample_shared_first_image(
    model,
    processor,
    inputs: dict[str, torch.Tensor],
    group_size: int,
    max_new_tokens: int,
    temperature: float = SamplingSpec.temperature,
    min_new_tokens: int = 0,
    return_scores: bool = False,
    draw: Callable[[torch.Tensor], torch.Tensor] = draw_tokens,
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
    explicitly: same distribution as ``sample_completions``, and with the same seed and
    ``draw_tokens_as_generate`` the same tokens. A row whose prefix no other row shares (a
    swapped comparison ``[j, anchor]``) is a prefix of its own: correct, only not cheaper. Needs a
    KV cache (no gradient checkpointing).
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
    # index_select, not keys[prefix_B]: see models.kv_cache.PrefixLayer.
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
    rows_N = group_rows(B, group_size, device)  # (N,)
    kv = [(layer.keys, layer.values) for layer in cache.layers]  # (B, kv_heads, Lp + Ls, d)
    return _sample_from_cache(model, processor, kv, rows_N, logits_BV, attention_mask, next_B, max_new_tokens,
                              temperature, min_new_tokens, return_scores, draw)  # fmt: skip
