"""Thin wrappers around Hugging Face's Qwen2.5-VL: load, build inputs, sample, per-token log-probs.

The same functions serve the tiny offline model and ``Qwen/Qwen2.5-VL-7B-Instruct``.

Shapes (key): ``B`` examples in a batch, ``L`` prompt tokens (left padded), ``T`` completion
tokens (right padded), ``V`` vocabulary. Qwen2.5-VL's image inputs are *packed*, not batch
first: ``pixel_values (P, C·tp·14·14)`` holds the patches of every image of the batch back to
back, and ``image_grid_thw (I, 3)`` has one ``(t, h, w)`` row per image, in prompt order; image
``i`` owns ``t·h·w`` patch rows and ``t·h·w / merge²`` ``<|image_pad|>`` tokens.

Facts this module relies on (DESIGN §8, measured with transformers 5.23):
- ``Qwen2_5_VLProcessor`` / ``AutoProcessor`` need torchvision for the video processor, so we
  use an image-only subclass and save it under the standard class name.
- Sampling suppresses the vision special tokens (a random model may sample ``<|image_pad|>``,
  and the re-forward then fails) and uses ``top_k=0, top_p=1.0`` so that the distribution we
  sample from is the one we score.
- ``mm_token_type_ids`` (1 on image tokens) must reach every forward: without it transformers
  silently falls back to 1-D positions and log-probs drift by ~1e-2.
- Prefix sharing (``share_prefix`` / ``prompt_rows``): a prompt and its images go through the
  model once per group and the KV cache is indexed to its G completions. The positions of the
  continuation are passed explicitly (``rope_positions``), so the model's stateful
  ``rope_deltas`` never applies; layers under gradient checkpointing drop the cache, so there
  the log-prob pass repeats the prompt rows instead.
"""

from __future__ import annotations

import itertools
import json
from dataclasses import dataclass
from pathlib import Path

import torch
from PIL import Image
from transformers import (
    AutoTokenizer,
    GenerationConfig,
    Qwen2_5_VLForConditionalGeneration,
    Qwen2_5_VLProcessor,
    Qwen2VLImageProcessorPil,
)
from transformers.cache_utils import DynamicLayer
from transformers.utils import logging as hf_logging

# Our commands draw their own progress bars; transformers' per-load and per-save bars only add noise.
hf_logging.disable_progress_bar()

VISION_SPECIAL_TOKENS = (
    "<|vision_start|>",
    "<|vision_end|>",
    "<|vision_pad|>",
    "<|image_pad|>",
    "<|video_pad|>",
)


class ImageOnlyQwenVLProcessor(Qwen2_5_VLProcessor):
    """``Qwen2_5_VLProcessor`` without the video processor (which needs torchvision).

    Its ``__init__`` signature names only ``image_processor`` and ``tokenizer``, which is how
    ``ProcessorMixin`` decides which sub-processors exist.
    """

    def __init__(self, image_processor=None, tokenizer=None, chat_template=None, **kwargs):
        super().__init__(image_processor, tokenizer, None, chat_template=chat_template, **kwargs)


def save_processor(processor: ImageOnlyQwenVLProcessor, out_dir: str | Path) -> None:
    """Save the processor so that plain ``AutoProcessor`` can load the folder too."""
    out = Path(out_dir)
    processor.save_pretrained(out)
    for name in ("processor_config.json", "preprocessor_config.json", "tokenizer_config.json"):
        path = out / name
        if path.exists():
            cfg = json.loads(path.read_text())
            if "processor_class" in cfg:
                cfg["processor_class"] = "Qwen2_5_VLProcessor"
                path.write_text(json.dumps(cfg, indent=2, sort_keys=True) + "\n")


def load_processor(name_or_path: str, **hub_kwargs) -> ImageOnlyQwenVLProcessor:
    """The tokenizer, image processor and chat template of a Qwen2.5-VL folder or hub id."""
    tokenizer = AutoTokenizer.from_pretrained(name_or_path, trust_remote_code=False, **hub_kwargs)
    image_processor = Qwen2VLImageProcessorPil.from_pretrained(name_or_path, **hub_kwargs)
    chat_template = tokenizer.chat_template
    if chat_template is None:
        raise ValueError(f"{name_or_path} has no chat template; expected a Qwen2.5-VL-*-Instruct checkpoint")
    tokenizer.padding_side = "left"
    return ImageOnlyQwenVLProcessor(
        image_processor=image_processor, tokenizer=tokenizer, chat_template=chat_template
    )


def load_policy(
    name_or_path: str,
    dtype: torch.dtype | str = torch.float32,
    device: str | torch.device = "cpu",
    attn_implementation: str | None = None,
    **hub_kwargs,
) -> tuple[Qwen2_5_VLForConditionalGeneration, ImageOnlyQwenVLProcessor]:
    """Load a Qwen2.5-VL model and its image-only processor (hub id or local folder).

    ``trust_remote_code`` stays off; weights load from safetensors. Pass ``local_files_only=True``
    (or set ``HF_HUB_OFFLINE=1``) to forbid any download.
    """
    if isinstance(dtype, str):
        dtype = getattr(torch, dtype)
    kwargs = dict(dtype=dtype, trust_remote_code=False, use_safetensors=True, **hub_kwargs)
    if attn_implementation is not None:
        kwargs["attn_implementation"] = attn_implementation
    model = Qwen2_5_VLForConditionalGeneration.from_pretrained(name_or_path, **kwargs).to(device)
    processor = load_processor(name_or_path, **hub_kwargs)
    return model, processor


def token_ids(processor, texts: list[str] | tuple[str, ...]) -> list[int]:
    """The ids of tokens that must each be a single token (e.g. the digits of a rating scale)."""
    ids = []
    for text in texts:
        enc = processor.tokenizer.encode(text, add_special_tokens=False)
        if len(enc) != 1:
            raise ValueError(f"{text!r} is {len(enc)} tokens in this tokenizer; the soft head needs one")
        ids.append(enc[0])
    return ids


# ---------------------------------------------------------------------------------------------
# Inputs


def build_inputs(processor, texts: list[str], images: list[list[Image.Image]]) -> dict[str, torch.Tensor]:
    """Tokenize chat-formatted prompts with their images into one left-padded batch.

    ``texts[b]`` is the rendered chat prompt of example ``b`` (see ``render_prompt``) and
    ``images[b]`` its images in order. Returns ``input_ids (B, L)``, ``attention_mask (B, L)``,
    ``mm_token_type_ids (B, L)``, ``pixel_values (P, D)`` and ``image_grid_thw (I, 3)``.
    """
    assert len(texts) == len(images), "one image list per prompt"
    flat = [im for ims in images for im in ims]
    processor.tokenizer.padding_side = "left"
    enc = processor(text=texts, images=flat or None, padding=True, return_tensors="pt")
    if "mm_token_type_ids" not in enc:
        enc["mm_token_type_ids"] = (enc["input_ids"] == processor.image_token_id).long()
    return dict(enc)


def render_prompt(processor, messages: list[dict]) -> str:
    """The chat-template text of one conversation, ending with the assistant's turn opener."""
    return processor.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)


# ---------------------------------------------------------------------------------------------
# Sampling


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


def suppressed_token_ids(processor) -> list[int]:
    return processor.tokenizer.convert_tokens_to_ids(list(VISION_SPECIAL_TOKENS))


def sampling_config(model, processor, max_new_tokens: int, temperature: float, min_new_tokens: int = 0):
    """The generation settings GRPO needs: plain sampling from the full softmax at ``temperature``."""
    gen = model.generation_config
    eos = gen.eos_token_id if isinstance(gen.eos_token_id, list) else [gen.eos_token_id]
    return GenerationConfig(
        do_sample=True,
        temperature=temperature,
        top_k=0,
        top_p=1.0,
        max_new_tokens=max_new_tokens,
        min_new_tokens=min_new_tokens,
        eos_token_id=eos,
        pad_token_id=processor.tokenizer.pad_token_id,
        suppress_tokens=suppressed_token_ids(processor),
        num_return_sequences=1,
    )


@torch.no_grad()
def sample_completions(
    model,
    processor,
    inputs: dict[str, torch.Tensor],
    group_size: int,
    max_new_tokens: int,
    temperature: float = 1.0,
    min_new_tokens: int = 0,
    return_scores: bool = False,
    share_prefix: bool = False,
) -> Completions | tuple[Completions, torch.Tensor]:
    """Sample ``group_size`` completions per prompt.

    By default with one batched ``generate`` call, which repeats every prompt G times *before*
    the prefill. With ``share_prefix`` each prompt (with its images) is prefilled once and its
    KV cache shared by its G completions (``sample_shared_prefix``): same distribution, the
    prompt's cost no longer grows with G.

    With ``return_scores`` the raw logits of each step come back too, ``(N, T, V)``, which the
    tests compare with our re-forward log-probs.
    """
    if share_prefix:
        return sample_shared_prefix(
            model, processor, inputs, group_size, max_new_tokens, temperature, min_new_tokens, return_scores
        )
    cfg = sampling_config(model, processor, max_new_tokens, temperature, min_new_tokens)
    cfg.num_return_sequences = group_size
    L = inputs["input_ids"].shape[1]
    cfg.return_dict_in_generate = True
    cfg.output_logits = return_scores
    out = model.generate(**inputs, generation_config=cfg)
    ids_NT = out.sequences[:, L:]  # (N, T)
    completions = _trim(ids_NT, processor, cfg.eos_token_id, max_new_tokens)
    if return_scores:
        return completions, torch.stack(out.logits, dim=1)  # (N, T, V)
    return completions


# ---------------------------------------------------------------------------------------------
# Shared prefixes: one prompt forward for the G completions of a group


def _hf_model(model):
    """The ``Qwen2_5_VLForConditionalGeneration`` under DDP and peft wrappers."""
    model = getattr(model, "module", model)  # DistributedDataParallel
    return model.get_base_model() if hasattr(model, "get_base_model") else model


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


# ---------------------------------------------------------------------------------------------
# Log-probs


def select_rows(inputs: dict[str, torch.Tensor], rows: torch.Tensor | list[int]) -> dict[str, torch.Tensor]:
    """Prompt rows ``rows`` of a batch (repeats allowed), with the packed images sliced to match.

    ``pixel_values`` and ``image_grid_thw`` are packed over all images of the batch, so a row's
    images are found by counting the image blocks of the rows before it.
    """
    rows = torch.as_tensor(rows, dtype=torch.long).tolist()
    out = {k: inputs[k][rows] for k in ("input_ids", "attention_mask", "mm_token_type_ids")}
    if "pixel_values" in inputs:
        counts = torch.tensor(image_counts(inputs))
        img_start = torch.cat([torch.zeros(1, dtype=torch.long), counts.cumsum(0)])  # (B+1,)
        patches = inputs["image_grid_thw"].prod(dim=1)  # (I,) patch rows per image
        patch_start = torch.cat([torch.zeros(1, dtype=torch.long), patches.cumsum(0).cpu()])  # (I+1,)
        pv, grid = [], []
        for r in rows:
            first, last = img_start[r], img_start[r + 1]
            pv.append(inputs["pixel_values"][patch_start[first] : patch_start[last]])
            grid.append(inputs["image_grid_thw"][first:last])
        out["pixel_values"] = torch.cat(pv)  # (P', D)
        out["image_grid_thw"] = torch.cat(grid)  # (I', 3)
    return out


def repeat_inputs(inputs: dict[str, torch.Tensor], group_size: int) -> dict[str, torch.Tensor]:
    """Repeat a batch of B prompts G times each: rows ``b·G … b·G+G−1`` are prompt ``b``."""
    B = inputs["input_ids"].shape[0]
    return select_rows(inputs, torch.arange(B).repeat_interleave(group_size))


def image_counts(inputs: dict[str, torch.Tensor]) -> list[int]:
    """Number of images in each prompt row, read from the ``<|vision_start|>`` blocks."""
    ids = inputs["input_ids"]
    mm = inputs["mm_token_type_ids"]
    # An image block is a run of image tokens; count run starts per row.
    starts = (mm == 1) & torch.nn.functional.pad(mm[:, :-1] != 1, (1, 0), value=True)
    return starts.sum(dim=1).tolist() if ids.numel() else []


def completion_logprobs(
    model,
    inputs: dict[str, torch.Tensor],
    completion_ids_NT: torch.Tensor,
    completion_mask_NT: torch.Tensor,
    temperature: float = 1.0,
    prompt_rows: torch.Tensor | None = None,
) -> torch.Tensor:
    """Per-token log π(y_t | prompt, images, y_<t) of the completions, ``(N, T)``.

    ``inputs`` holds one prompt row per completion (``repeat_inputs`` for groups), or, with
    ``prompt_rows``, P distinct prompts (see ``completion_logits``). The log-softmax is taken in
    float32 without keeping a second ``(N, T, V)`` tensor alive.
    """
    logits_NTV = completion_logits(
        model, inputs, completion_ids_NT, completion_mask_NT, temperature, prompt_rows
    )
    return selective_log_softmax(logits_NTV, completion_ids_NT)


def completion_logits(
    model,
    inputs: dict[str, torch.Tensor],
    completion_ids_NT: torch.Tensor,
    completion_mask_NT: torch.Tensor,
    temperature: float = 1.0,
    prompt_rows: torch.Tensor | None = None,
) -> torch.Tensor:
    """Logits / temperature at the positions that predict completion tokens, float32 ``(N, T, V)``.

    The forward runs over ``[prompt ‖ completion]`` but the LM head only over the ``T`` positions
    that predict completion tokens (``logits_to_keep``). Dividing by ``temperature`` scores the
    same distribution ``generate`` sampled from.

    With ``prompt_rows (N,)``, ``inputs`` holds P distinct prompts and completion ``n`` continues
    prompt ``prompt_rows[n]``: each prompt and its images go through the model once, and the
    completions attend to its keys/values (``prefill_shared``). Same values and gradients, the
    prompt's cost paid once per group instead of G times.
    """
    if prompt_rows is not None:
        layers = _hf_model(model).model.language_model.layers
        if any(layer.gradient_checkpointing and layer.training for layer in layers):
            # Checkpointed layers drop the KV cache: repeat the prompt rows instead (same result).
            inputs = select_rows(inputs, prompt_rows)
        else:
            return _shared_prefix_logits(
                model, inputs, completion_ids_NT, completion_mask_NT, temperature, prompt_rows
            )
    N, T = completion_ids_NT.shape
    input_ids = torch.cat([inputs["input_ids"], completion_ids_NT], dim=1)  # (N, L+T)
    attention_mask = torch.cat(
        [inputs["attention_mask"], completion_mask_NT.to(inputs["attention_mask"])], dim=1
    )
    mm = torch.cat([inputs["mm_token_type_ids"], torch.zeros_like(completion_ids_NT)], dim=1)
    extra = {k: inputs[k] for k in ("pixel_values", "image_grid_thw") if k in inputs}
    out = model(
        input_ids=input_ids,
        attention_mask=attention_mask,
        mm_token_type_ids=mm,
        logits_to_keep=T + 1,
        use_cache=False,
        **extra,
    )
    return out.logits[:, :-1, :].float() / temperature  # (N, T, V): position t predicts token t


def _shared_prefix_logits(model, inputs, ids_NT, mask_NT, temperature, prompt_rows) -> torch.Tensor:
    """``completion_logits`` with one forward per distinct prompt (see ``prefill_shared``)."""
    rows_N = torch.as_tensor(prompt_rows, dtype=torch.long, device=ids_NT.device)
    cache, first_NV, prompt_mask, next_N = prefill_shared(model, inputs, rows_N)
    logits = [first_NV[:, None]]  # (N, 1, V): predicts completion token 0
    if ids_NT.shape[1] > 1:  # tokens 0 … T−2 predict tokens 1 … T−1
        attention_mask = torch.cat([prompt_mask, mask_NT[:, :-1].to(prompt_mask)], dim=1)
        logits.append(_decode(model, ids_NT[:, :-1], attention_mask, next_N, cache))
    return torch.cat(logits, dim=1).float() / temperature  # (N, T, V)


def selective_log_softmax(logits_NTV: torch.Tensor, ids_NT: torch.Tensor) -> torch.Tensor:
    """``log_softmax(logits)[ids]`` without keeping a second (N, T, V) tensor alive."""
    picked = torch.gather(logits_NTV, -1, ids_NT.unsqueeze(-1)).squeeze(-1)  # (N, T)
    return picked - torch.logsumexp(logits_NTV, dim=-1)
