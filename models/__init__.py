"""Qwen2.5-VL for GRPO and for scoring. Each file imports only the ones above it in this table:

| file            | what it holds |
|-----------------|---------------|
| ``qwen_vl.py``  | ``load_policy`` / ``load_processor``, pixel bounds, ``render_prompt``, ``build_inputs``, ``select_rows`` / ``repeat_inputs``, ``unwrap`` |
| ``kv_cache.py`` | prefix sharing's pieces: a prompt forwarded once (``prefill_prompts``), its keys/values seen by the G rows that continue it, ``decode`` on top; safe under activation checkpointing |
| ``sampling.py`` | ``sample_completions`` (``generate``, or one prefill per prompt with ``share_prefix``), ``sample_shared_first_image`` |
| ``logprobs.py`` | ``completion_logprobs``: hidden states at the completion positions (one prompt forward per group with ``prompt_rows``), then LM head + log-softmax by chunks, never (N, T, V) logits |
| ``soft_head.py``| soft scores at the answer position |

``tiny.py`` builds the offline test models (``python -m models.tiny OUT``).
"""
