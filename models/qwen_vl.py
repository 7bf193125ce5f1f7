"""Qwen2.5-VL for GRPO: the functions the rest of the project calls, gathered from the files that hold them.

``models`` reads in one direction, each file importing only the ones above it:

| file                | what it holds |
|---------------------|---------------|
| ``loading.py``      | ``load_policy`` / ``load_processor``, pixel bounds, ``render_prompt``, ``build_inputs``, ``select_rows`` / ``repeat_inputs``, ``unwrap`` |
| ``kv_cache.py``     | prefix sharing's pieces: a prompt forwarded once (``prefill_prompts``), its keys/values seen by the G rows that continue it, ``decode`` on top; safe under activation checkpointing |
| ``sampling.py``     | ``sample_completions`` (``generate``, or one prefill per prompt with ``share_prefix``), ``sample_shared_first_image`` |
| ``logprobs.py``     | ``completion_logprobs``: hidden states at the completion positions (one prompt forward per group with ``prompt_rows``), then LM head + log-softmax by chunks, never (N, T, V) logits |
| ``soft_head.py``    | soft scores at the answer position |
| ``qwen_vl.py``      | this file: the public names above, importable from one place (and from where they lived before issue 13) |

``tiny.py`` builds the offline test models.
"""

from models.kv_cache import kv_cache_available, rope_positions
from models.loading import (
    DEFAULT_MAX_PIXELS,
    ImageOnlyQwenVLProcessor,
    build_inputs,
    image_counts,
    image_token_count,
    load_chat_template,
    load_policy,
    load_processor,
    render_prompt,
    repeat_inputs,
    save_processor,
    select_rows,
    set_pixel_bounds,
    token_ids,
    unwrap,
    vision_token_ids,
)
from models.logprobs import (
    completion_hidden,
    completion_logits,
    completion_logprobs,
    selective_log_softmax,
    token_logprobs,
)
from models.sampling import (
    Completions,
    neutral_generation_defaults,
    sample_completions,
    sample_shared_first_image,
    sample_shared_prefix,
    sampling_config,
)

__all__ = [
    "DEFAULT_MAX_PIXELS", "Completions", "ImageOnlyQwenVLProcessor", "build_inputs",
    "completion_hidden", "completion_logits", "completion_logprobs", "image_counts", "image_token_count",
    "kv_cache_available", "load_chat_template", "load_policy", "load_processor", "neutral_generation_defaults",
    "render_prompt", "repeat_inputs", "rope_positions", "sample_completions", "sample_shared_first_image",
    "sample_shared_prefix", "sampling_config", "save_processor", "select_rows", "selective_log_softmax",
    "set_pixel_bounds", "token_ids", "token_logprobs", "unwrap", "vision_token_ids",
]  # fmt: skip
