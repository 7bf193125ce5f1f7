"""Per-token log-probs of sampled completions, log π(y_t | prompt, images, y_<t), without (N, T, V) logits.

The reference, old-policy and update passes of GRPO all need one number per completion token.
Computing it the obvious way materialises float32 logits over the whole vocabulary: for the real
Qwen2.5-VL (V = 152,064), N = 16 completions of T = 512 tokens that is 5 GB, plus as much again for
the gradient of the log-softmax. Here the work is split in two:

1. ``completion_hidden``: the decoder's final hidden states at the T positions that predict the
   completion tokens, ``(N, T, H)``, with the LM head switched off (``lm_head_off``). With
   ``prompt_rows`` each distinct prompt (with its images) goes through the model once and its G
   completions attend to its keys/values (``models.kv_cache``), with or without activation
   checkpointing.
2. ``token_logprobs``: LM head + log-softmax + the taken token, by chunks of positions. A chunk's
   float32 logits take at most ``LOGITS_CHUNK_BYTES``, and the backward recomputes them instead of
   keeping them: peak memory holds one chunk of logits, never (N, T, V). Padding positions
   (``mask_NT == 0``) are skipped; their log-prob is 0. A plain ``nn.Linear`` head goes through
   ``HeadLogprobs``, whose forward and backward reuse one buffer for every chunk and write the
   softmax's gradient in place; a wrapped head (an FSDP unit gathers its weight when called)
   is called as a module, each chunk under ``torch.utils.checkpoint``.

The values are today's ``selective_log_softmax(completion_logits(...))`` to float rounding (the LM
head's matrix product runs over chunks of rows instead of all rows at once): tested against it on
the tiny model and on a model of the real configuration, gradients included.

Shapes: ``N`` completions, ``L`` prompt tokens, ``T`` completion tokens, ``H`` hidden, ``V``
vocabulary, ``M`` real (unmasked) completion tokens, ``P`` distinct prompts.
"""

from __future__ import annotations

from contextlib import contextmanager

import torch
from torch.utils.checkpoint import checkpoint

from common.config import SamplingSpec
from models.kv_cache import cache_kept_under_checkpointing, decode, prefill_shared
from models.qwen_vl import select_rows, unwrap, vision_token_ids
from models.sampling import at_temperature

# float32 logits of one chunk of positions: 64 MiB is 110 positions at V = 152,064 (the whole batch
# at the tiny model's V = 896). Larger chunks gain little: the LM head's matrix product is already
# (positions × H) @ (H × V) with V in the hundred thousands.
LOGITS_CHUNK_BYTES = 64 * 2**20


def completion_logprobs(
    model,
    inputs: dict[str, torch.Tensor],
    completion_ids_NT: torch.Tensor,
    completion_mask_NT: torch.Tensor,
    temperature: float = SamplingSpec.temperature,
    prompt_rows: torch.Tensor | None = None,
) -> torch.Tensor:
    """Per-token log π(y_t | prompt, images, y_<t) of the completions, float32 ``(N, T)``, 0 on padding.

    ``inputs`` holds one prompt row per completion (``repeat_inputs`` for groups), or, with
    ``prompt_rows (N,)``, P distinct prompts, completion ``n`` continuing prompt
    ``prompt_rows[n]``: each prompt and its images then go through the model once. Dividing the
    logits by ``temperature`` scores the distribution ``sample_completions`` sampled from.
    """
    hidden_NTH = completion_hidden(model, inputs, completion_ids_NT, completion_mask_NT, prompt_rows)
    return token_logprobs(unwrap(model).lm_head, hidden_NTH, completion_ids_NT, completion_mask_NT, temperature,
                          suppressed=vision_token_ids(model))  # fmt: skip


def token_logprobs(
    head: torch.nn.Module,
    hidden_NTH: torch.Tensor,
    ids_NT: torch.Tensor,
    mask_NT: torch.Tensor,
    temperature: float = SamplingSpec.temperature,
    chunk_bytes: int | None = None,
    suppressed: list[int] | None = None,
) -> torch.Tensor:
    """``log_softmax(head(h) / temperature)[y]`` at every real position, chunk by chunk, ``(N, T)``.

    ``suppressed`` token ids are left out of the softmax (logit −∞), as sampling leaves them out:
    the log-probs are those of the distribution the completions were drawn from.

    ``head`` is the model's LM head. Each chunk of at most ``chunk_bytes / (4·V)`` positions
    (``LOGITS_CHUNK_BYTES`` by default) computes ``z = head(h).float() / τ`` and
    ``z[y] − logsumexp(z)``, and the backward recomputes ``z`` instead of keeping it. A plain
    ``nn.Linear`` head runs in ``HeadLogprobs`` (the product in the autocast dtype when autocast
    is on, as the module would); any other head (an FSDP unit, whose call gathers its weight) is
    called as a module, each chunk under ``torch.utils.checkpoint``.
    """
    V = head.out_features
    real_NT = mask_NT.bool()
    h_MH, ids_M = hidden_NTH[real_NT], ids_NT[real_NT]  # (M, H), (M,): real tokens only
    chunk = max(1, (chunk_bytes or LOGITS_CHUNK_BYTES) // (4 * V))
    suppressed_S = torch.tensor(suppressed or [], dtype=torch.long, device=ids_NT.device)
    if type(head) is torch.nn.Linear and head.bias is None and h_MH.shape[0] > 0:
        device = h_MH.device.type
        dtype = torch.get_autocast_dtype(device) if torch.is_autocast_enabled(device) else head.weight.dtype
        logp_M = HeadLogprobs.apply(h_MH, head.weight, ids_M, temperature, suppressed_S, chunk, dtype)
    else:
        logp_M = _module_logprobs(head, h_MH, ids_M, temperature, suppressed_S, chunk)
    logp_NT = torch.zeros(ids_NT.shape, dtype=torch.float32, device=ids_NT.device)
    return logp_NT.masked_scatter(real_NT, logp_M)


class HeadLogprobs(torch.autograd.Function):
    """``log_softmax(h Wᵀ / τ)[y]`` for M positions, chunk by chunk, with a hand-written backward.

    Forward, per chunk of C positions: ``z = h Wᵀ / τ`` into one reused float32 ``(C, V)`` buffer
    (the matrix product in ``dtype``: the autocast dtype, else the weight's), suppressed columns
    set to −∞, then in place ``z − max``, ``exp``, a row sum: ``log p_y = z_y − lse``. Only ``lse``
    (M,) is kept. Backward, per chunk: ``z`` again into the same buffer, ``p = exp(z − lse)`` in
    place, then ``∂ log p_y / ∂z = onehot(y) − p`` scaled by the incoming gradient and ``1/τ``,
    still in place, and two matrix products: ``∂h = D W`` and ``∂W += Dᵀ h`` (float32). Where
    autograd through the module would allocate the logits, their scaled and masked copies, the
    softmax and each gradient afresh for every chunk, this holds one ``(C, V)`` buffer (and its
    ``dtype`` twin under bf16) for the whole pass.
    """

    @staticmethod
    def forward(ctx, h_MH, weight_VH, ids_M, temperature, suppressed_S, chunk, dtype):
        scores = _ChunkScores(weight_VH, temperature, suppressed_S, min(chunk, h_MH.shape[0]), dtype)
        logp_M = torch.empty(h_MH.shape[0], dtype=torch.float32, device=h_MH.device)
        lse_M = torch.empty_like(logp_M)
        for s in range(0, h_MH.shape[0], chunk):
            z_CV = scores(h_MH[s : s + chunk])
            max_C = z_CV.amax(dim=-1)
            picked_C = z_CV.gather(-1, ids_M[s : s + chunk, None]).squeeze(-1)
            lse_M[s : s + chunk] = z_CV.sub_(max_C[:, None]).exp_().sum(dim=-1).log_().add_(max_C)
            logp_M[s : s + chunk] = picked_C - lse_M[s : s + chunk]
        ctx.save_for_backward(h_MH, weight_VH, ids_M, lse_M, suppressed_S)
        ctx.temperature, ctx.chunk, ctx.dtype = temperature, chunk, dtype
        return logp_M

    @staticmethod
    def backward(ctx, grad_M):
        h_MH, weight_VH, ids_M, lse_M, suppressed_S = ctx.saved_tensors
        need_h, need_w = ctx.needs_input_grad[:2]
        chunk, dtype = ctx.chunk, ctx.dtype
        scores = _ChunkScores(weight_VH, ctx.temperature, suppressed_S, min(chunk, h_MH.shape[0]), dtype)
        g_M = grad_M.float() / ctx.temperature  # ∂z/∂logits = 1/τ
        grad_h = torch.empty(h_MH.shape, dtype=dtype, device=h_MH.device) if need_h else None
        grad_w = torch.zeros(weight_VH.shape, dtype=torch.float32, device=h_MH.device) if need_w else None
        for s in range(0, h_MH.shape[0], chunk):
            h_CH, g_C = h_MH[s : s + chunk], g_M[s : s + chunk, None]
            d_CV = scores(h_CH).sub_(lse_M[s : s + chunk, None]).exp_()  # softmax p; 0 where suppressed
            d_CV.mul_(-g_C).scatter_add_(-1, ids_M[s : s + chunk, None], g_C)  # g (onehot(y) − p) / τ
            if need_h:
                torch.mm(scores.low(d_CV), scores.weight, out=grad_h[s : s + chunk])
            if need_w:
                grad_w.addmm_(d_CV.t(), h_CH.float())
        return (grad_h.to(h_MH.dtype) if need_h else None, grad_w.to(weight_VH.dtype) if need_w else None,
                None, None, None, None, None)  # fmt: skip


class _ChunkScores:
    """``h Wᵀ / τ`` of up to ``rows`` positions, suppressed columns −∞, into one float32 buffer."""

    def __init__(self, weight_VH, temperature, suppressed_S, rows, dtype):
        self.weight = weight_VH.to(dtype)  # cast once per pass (the weight itself when dtypes agree)
        self.temperature, self.suppressed = temperature, suppressed_S
        V = weight_VH.shape[0]
        self.z = torch.empty(rows, V, dtype=torch.float32, device=weight_VH.device)
        low = dtype != torch.float32
        self.z_low = torch.empty(rows, V, dtype=dtype, device=weight_VH.device) if low else None

    def __call__(self, h_CH):
        C = h_CH.shape[0]
        z_CV = self.z[:C]
        if self.z_low is None:
            torch.mm(h_CH.to(self.weight.dtype), self.weight.t(), out=z_CV)
        else:
            z_CV.copy_(torch.mm(h_CH.to(self.weight.dtype), self.weight.t(), out=self.z_low[:C]))
        at_temperature(z_CV, self.temperature, in_place=True)
        return z_CV.index_fill_(-1, self.suppressed, -torch.inf)

    def low(self, d_CV):
        """``d_CV`` in the matrix products' dtype (in the second buffer under bf16)."""
        return d_CV if self.z_low is None else self.z_low[: d_CV.shape[0]].copy_(d_CV)


def _module_logprobs(head, h_MH, ids_M, temperature, suppressed_S, chunk) -> torch.Tensor:
    """``token_logprobs`` through the head's ``__call__``, each chunk checkpointed under autograd."""
    track = torch.is_grad_enabled() and (h_MH.requires_grad or head.weight.requires_grad)
    pieces = []
    for start in range(0, h_MH.shape[0], chunk):
        args = (head, h_MH[start : start + chunk], ids_M[start : start + chunk], temperature, suppressed_S)
        if track:
            pieces.append(checkpoint(_chunk_logprobs, *args, use_reentrant=False, preserve_rng_state=False))
        else:
            pieces.append(_chunk_logprobs(*args))
    return torch.cat(pieces) if pieces else h_MH.new_zeros(0, dtype=torch.float32)


def _chunk_logprobs(
    head, h_CH: torch.Tensor, ids_C: torch.Tensor, temperature: float, suppressed_S
) -> torch.Tensor:
    logits_CV = at_temperature(head(h_CH).float(), temperature)  # (C, V): the only vocabulary-sized tensor
    logits_CV = logits_CV.index_fill(-1, suppressed_S, -torch.inf)  # never sampled, never scored
    return logits_CV.gather(-1, ids_C[:, None]).squeeze(-1) - logits_CV.logsumexp(dim=-1)  # (C,)


@contextmanager
def lm_head_off(model):
    """The model's LM head replaced by the identity for the block: ``out.logits`` of a forward are
    then the final hidden states at the kept positions. The forward still goes through every wrapper
    (DDP, peft), which calling the decoder alone would skip."""
    hf = unwrap(model)
    head, hf.lm_head = hf.lm_head, torch.nn.Identity()
    try:
        yield
    finally:
        hf.lm_head = head


def completion_hidden(
    model,
    inputs: dict[str, torch.Tensor],
    ids_NT: torch.Tensor,
    mask_NT: torch.Tensor,
    prompt_rows: torch.Tensor | None = None,
) -> torch.Tensor:
    """Final hidden states at the positions that predict completion tokens, ``(N, T, H)``.

    Position t of the result is the state after ``[prompt ‖ y_<t]``: it predicts ``y_t``. Without
    ``prompt_rows``, one forward over ``[prompt ‖ completion]`` per row; with it, one forward per
    distinct prompt (``prefill_shared``) and one over the completions on top of its keys/values.
    """
    with lm_head_off(model):
        if prompt_rows is not None:
            return _shared_prefix_hidden(model, inputs, ids_NT, mask_NT, prompt_rows)
        T = ids_NT.shape[1]
        extra = {k: inputs[k] for k in ("pixel_values", "image_grid_thw") if k in inputs}
        out = model(
            input_ids=torch.cat([inputs["input_ids"], ids_NT], dim=1),  # (N, L+T)
            attention_mask=torch.cat([inputs["attention_mask"], mask_NT.to(inputs["attention_mask"])], dim=1),
            mm_token_type_ids=torch.cat([inputs["mm_token_type_ids"], torch.zeros_like(ids_NT)], dim=1),
            logits_to_keep=T + 1,
            use_cache=False,
            **extra,
        )
        return out.logits[:, :-1]  # (N, T, H): position t predicts token t


def _shared_prefix_hidden(model, inputs, ids_NT, mask_NT, prompt_rows) -> torch.Tensor:
    rows_N = torch.as_tensor(prompt_rows, dtype=torch.long, device=ids_NT.device)
    with cache_kept_under_checkpointing(model):
        cache, first_NH, prompt_mask, next_N = prefill_shared(model, inputs, rows_N)
        hidden = [first_NH[:, None]]  # (N, 1, H): predicts completion token 0
        if ids_NT.shape[1] > 1:  # tokens 0 … T−2 predict tokens 1 … T−1
            attention_mask = torch.cat([prompt_mask, mask_NT[:, :-1].to(prompt_mask)], dim=1)  # (N, L+T−1)
            hidden.append(decode(model, ids_NT[:, :-1], attention_mask, next_N, cache))
    return torch.cat(hidden, dim=1)  # (N, T, H)


# ---------------------------------------------------------------------------------------------
# The obvious computation, (N, T, V) logits: the reference the tests hold the chunked path to


def completion_logits(
    model,
    inputs: dict[str, torch.Tensor],
    completion_ids_NT: torch.Tensor,
    completion_mask_NT: torch.Tensor,
    temperature: float = SamplingSpec.temperature,
    prompt_rows: torch.Tensor | None = None,
) -> torch.Tensor:
    """Logits / temperature at the positions that predict completion tokens, float32 ``(N, T, V)``.

    One forward over ``[prompt ‖ completion]`` per completion (``prompt_rows`` repeats the prompt
    rows), the LM head over the ``T`` positions only (``logits_to_keep``). Memory grows with N·T·V:
    for log-probs use ``completion_logprobs``.
    """
    if prompt_rows is not None:
        inputs = select_rows(inputs, prompt_rows)
    T = completion_ids_NT.shape[1]
    extra = {k: inputs[k] for k in ("pixel_values", "image_grid_thw") if k in inputs}
    out = model(
        input_ids=torch.cat([inputs["input_ids"], completion_ids_NT], dim=1),  # (N, L+T)
        attention_mask=torch.cat(
            [inputs["attention_mask"], completion_mask_NT.to(inputs["attention_mask"])], dim=1
        ),
        mm_token_type_ids=torch.cat(
            [inputs["mm_token_type_ids"], torch.zeros_like(completion_ids_NT)], dim=1
        ),
        logits_to_keep=T + 1,
        use_cache=False,
        **extra,
    )
    logits_NTV = at_temperature(
        out.logits[:, :-1, :].float(), temperature
    )  # (N, T, V): position t predicts token t
    suppressed = torch.tensor(vision_token_ids(model), device=logits_NTV.device)
    return logits_NTV.index_fill(-1, suppressed, -torch.inf)  # as sampled: the vision tokens never are


def selective_log_softmax(logits_NTV: torch.Tensor, ids_NT: torch.Tensor) -> torch.Tensor:
    """``log_softmax(logits)[ids]`` without keeping a second (N, T, V) tensor alive."""
    picked = torch.gather(logits_NTV, -1, ids_NT.unsqueeze(-1)).squeeze(-1)  # (N, T)
    return picked - torch.logsumexp(logits_NTV, dim=-1)
