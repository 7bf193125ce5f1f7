"""Loading Qwen2.5-VL and building its inputs: the bottom of ``models`` (it imports no other module of it).

The same functions serve the tiny offline model and ``Qwen/Qwen2.5-VL-7B-Instruct``: the model and
its image-only processor, pixel bounds, the chat prompt, one left-padded batch, and rows of a batch
(``select_rows``, ``repeat_inputs``) with their packed images.

Shapes (key): ``B`` examples in a batch, ``L`` prompt tokens (left padded), ``T`` completion
tokens (right padded), ``V`` vocabulary. Qwen2.5-VL's image inputs are *packed*, not batch
first: ``pixel_values (P, C·tp·14·14)`` holds the patches of every image of the batch back to
back, and ``image_grid_thw (I, 3)`` has one ``(t, h, w)`` row per image, in prompt order; image
``i`` owns ``t·h·w`` patch rows and ``t·h·w / merge²`` ``<|image_pad|>`` tokens.

Facts this module relies on (docs/facts.md, measured with transformers 5.23):
- ``Qwen2_5_VLProcessor`` / ``AutoProcessor`` need torchvision for the video processor, so we
  use an image-only subclass and save it under the standard class name.
- ``mm_token_type_ids`` (1 on image tokens) must reach every forward: without it transformers
  silently falls back to 1-D positions and log-probs drift by ~1e-2.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from PIL import Image
from transformers import (
    AutoTokenizer,
    Qwen2_5_VLForConditionalGeneration,
    Qwen2_5_VLProcessor,
    Qwen2VLImageProcessorPil,
)
from transformers.utils import logging as hf_logging

# Our commands draw their own progress bars; transformers' per-load and per-save bars only add noise.
hf_logging.disable_progress_bar()


class ImageOnlyQwenVLProcessor(Qwen2_5_VLProcessor):
    """``Qwen2_5_VLProcessor`` without the video processor (which needs torchvision).

    Its ``__init__`` signature names only ``image_processor`` and ``tokenizer``, which is how
    ``ProcessorMixin`` decides which sub-processors exist.
    """

    def __init__(self, image_processor=None, tokenizer=None, chat_template=None, **kwargs):
        super().__init__(image_processor, tokenizer, None, chat_template=chat_template, **kwargs)


def save_processor(processor: ImageOnlyQwenVLProcessor, out_dir: str | Path) -> None:
    """Save the processor so that plain Hugging Face tools load the folder as a real checkpoint.

    Writes what an upstream Qwen2.5-VL folder has: ``processor_config.json`` and
    ``preprocessor_config.json`` (with ``min_pixels`` / ``max_pixels``, the keys older
    transformers read), the tokenizer and the chat template, all naming the standard
    ``Qwen2_5_VLProcessor`` (our image-only subclass is only how we load it without torchvision).
    """
    out = Path(out_dir)
    processor.save_pretrained(out)
    processor.image_processor.save_pretrained(out)  # preprocessor_config.json
    size = processor.image_processor.size
    for name in ("processor_config.json", "preprocessor_config.json", "tokenizer_config.json"):
        path = out / name
        if not path.exists():
            continue
        cfg = json.loads(path.read_text())
        if "processor_class" in cfg or name != "tokenizer_config.json":
            cfg["processor_class"] = "Qwen2_5_VLProcessor"
        if name == "preprocessor_config.json":
            cfg["min_pixels"], cfg["max_pixels"] = size["shortest_edge"], size["longest_edge"]
        path.write_text(json.dumps(cfg, indent=2, sort_keys=True) + "\n")


def load_chat_template(name_or_path: str, tokenizer, **hub_kwargs) -> str:
    """The vision chat template of a checkpoint, wherever the checkpoint keeps it.

    The processor's own template file comes first (``chat_template.jinja``, then the legacy
    ``chat_template.json``), as in Hugging Face's processors; the tokenizer's template only when
    neither exists. Order matters: Qwen2.5-VL-7B-Instruct's first upload (January 2025, and every
    local cache made before April 2025) has the *text-only* Qwen2.5 template in
    ``tokenizer_config.json`` and the vision template only in ``chat_template.json``.
    """
    from transformers.utils import cached_file

    template = None
    for name in ("chat_template.jinja", "chat_template.json"):
        path = cached_file(name_or_path, name, _raise_exceptions_for_missing_entries=False, **hub_kwargs)
        if path is not None:
            text = Path(path).read_text(encoding="utf-8")
            template = text if name.endswith(".jinja") else json.loads(text)["chat_template"]
            break
    template = template or tokenizer.chat_template
    if not template:
        raise ValueError(f"{name_or_path} has no chat template; expected a Qwen2.5-VL-*-Instruct checkpoint")
    if "<|image_pad|>" not in template:
        raise ValueError(
            f"{name_or_path}: its chat template has no <|image_pad|> (a text-only template); "
            "expected a Qwen2.5-VL-*-Instruct checkpoint"
        )
    return template


def load_processor(name_or_path: str, **hub_kwargs) -> ImageOnlyQwenVLProcessor:
    """The tokenizer, image processor and chat template of a Qwen2.5-VL folder or hub id."""
    tokenizer = AutoTokenizer.from_pretrained(name_or_path, trust_remote_code=False, **hub_kwargs)
    image_processor = Qwen2VLImageProcessorPil.from_pretrained(name_or_path, **hub_kwargs)
    chat_template = load_chat_template(name_or_path, tokenizer, **hub_kwargs)
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


def resolve_device(name: str) -> str:
    """``train.device``: ``auto`` is ``cuda`` where a GPU is visible, else ``cpu``; any other name as given."""
    if name == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    return name


# 512 · 28 · 28: at most 512 image tokens per image, the cap of the shipped experiments. The real
# processor allows 12,845,056 pixels (16,384 tokens): a 4000×3000 photo would cost 15,301 tokens.
DEFAULT_MAX_PIXELS = 401_408


def vision_token_ids(model) -> list[int]:
    """The five vision special tokens (``<|vision_start|>``, ``<|vision_end|>``, ``<|vision_pad|>``,
    ``<|image_pad|>``, ``<|video_pad|>``), contiguous in Qwen's vocabulary, read from the config.
    Sampling suppresses them (a random model may draw ``<|image_pad|>``, and the re-forward then
    fails), and the log-prob passes score the softmax without them: the distribution that was
    sampled. The one list both read."""
    config = unwrap(model).config
    return list(range(config.vision_start_token_id, config.video_token_id + 1))


def set_pixel_bounds(processor, min_pixels: int = 0, max_pixels: int = 0) -> None:
    """Override the image processor's area bounds in pixels (0 keeps the checkpoint's)."""
    if min_pixels:
        processor.image_processor.size["shortest_edge"] = min_pixels
    if max_pixels:
        processor.image_processor.size["longest_edge"] = max_pixels


def image_token_count(processor, image: Image.Image) -> int:
    """``<|image_pad|>`` tokens ``image`` costs under the processor's current pixel bounds."""
    ip = processor.image_processor
    return ip.get_number_of_image_patches(image.height, image.width) // ip.merge_size**2


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
# Rows of a batch


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


def group_rows(B: int, group_size: int, device: torch.device | str | None = None) -> torch.Tensor:
    """The prompt of each of ``N = B·G`` completions: row ``n`` belongs to prompt ``n // G``, ``(N,)``."""
    return torch.arange(B, device=device).repeat_interleave(group_size)  # (N,)


def repeat_inputs(inputs: dict[str, torch.Tensor], group_size: int) -> dict[str, torch.Tensor]:
    """Repeat a batch of B prompts G times each: rows ``b·G … b·G+G−1`` are prompt ``b``."""
    return select_rows(inputs, group_rows(inputs["input_ids"].shape[0], group_size))


def image_counts(inputs: dict[str, torch.Tensor]) -> list[int]:
    """Number of images in each prompt row, read from the ``<|vision_start|>`` blocks."""
    ids = inputs["input_ids"]
    mm = inputs["mm_token_type_ids"]
    # An image block is a run of image tokens; count run starts per row.
    starts = (mm == 1) & torch.nn.functional.pad(mm[:, :-1] != 1, (1, 0), value=True)
    return starts.sum(dim=1).tolist() if ids.numel() else []


def unwrap(model):
    """The Hugging Face ``Qwen2_5_VLForConditionalGeneration`` under DDP and peft wrappers."""
    model = getattr(model, "module", model)  # DistributedDataParallel
    if hasattr(model, "get_base_model"):  # peft: LoRA layers live inside the base model's modules
        model = model.get_base_model()
    return model
