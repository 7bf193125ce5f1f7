"""Soft scores: turn the answer-token logits into a continuous score (arXiv 2503.19948, its soft rewards).

Instead of the digit the model sampled, read the distribution at the answer position:

- **soft rating**: restrict the softmax to the valid rating tokens and take the expectation
  ``E[r | C] = Σ_i r_i · p(r_i | C)``, ``p(r_i | C) = exp f(r_i) / Σ_j exp f(r_j)``;
- **soft pairwise**: ``p(1 | C) = exp f(1) / (exp f(0) + exp f(1))``, the probability that the
  second image is preferred (the same expectation over the answers {0, 1}).

``C`` is the prompt, the images and the model's own reasoning up to ``<answer>``. The answer
position is the first non-blank token after the ``<answer>`` tag. A completion with no usable
answer there still gets a defined score: its text up to ``</think>`` (or all of it) is followed
by ``</think><answer>`` and the logits are read at the end of that (one extra forward, for
those rows only).

Soft scores are read at τ = 1 whatever temperature sampled the reasoning: ``logits_at`` returns
the LM head's raw logits and nothing here divides them. The temperature shapes which reasoning
``C`` is written; the answer distribution given ``C`` is the model's own.

Shapes: ``N`` completions, ``L`` prompt tokens, ``T`` completion tokens, ``V`` vocabulary, ``H`` hidden.
"""

from __future__ import annotations

import torch

from data.prompts import ANSWER_OPEN, THINK_CLOSE, parse_completion
from models.qwen_vl import select_rows, unwrap


def expected_rating(logits: torch.Tensor, rating_token_ids, rating_values) -> torch.Tensor:
    """``E[r] = Σ_i r_i softmax(f(r_1), …, f(r_K))_i`` for logits ``(..., V)`` → ``(...)``."""
    ids = torch.as_tensor(rating_token_ids, device=logits.device)
    values = torch.as_tensor(rating_values, dtype=torch.float32, device=logits.device)
    p = torch.softmax(logits[..., ids].float(), dim=-1)  # (..., K)
    return (p * values).sum(dim=-1)


def pair_probability(logits: torch.Tensor, token_id_0: int, token_id_1: int) -> torch.Tensor:
    """``p(1) = e^{f(1)} / (e^{f(0)} + e^{f(1)})`` for logits ``(..., V)`` → ``(...)``."""
    return torch.sigmoid(logits[..., token_id_1].float() - logits[..., token_id_0].float())


def answer_score(logits: torch.Tensor, answer_ids: list[int], answer_values: tuple[int, ...]) -> torch.Tensor:
    """The soft score of the task: ``pair_probability`` for the pair answers (0, 1), else
    ``expected_rating`` (for (0, 1) the two are the same number; the pairwise equation is the one
    the paper writes)."""
    if tuple(answer_values) == (0, 1):
        return pair_probability(logits, answer_ids[0], answer_ids[1])
    return expected_rating(logits, answer_ids, answer_values)


def answer_choice(answer_logits_NA: torch.Tensor, answer_values: tuple[int, ...]) -> torch.Tensor:
    """The most probable valid answer (the argmax of the distribution the soft score averages over),
    from the logits of the answer tokens only ``(N, A)`` → ``(N,)``; a tie takes the first value."""
    values = torch.as_tensor(answer_values, dtype=torch.float32, device=answer_logits_NA.device)
    return values[answer_logits_NA.argmax(dim=-1)]


def answer_token_index(token_texts: list[str], answer: int) -> int | None:
    """Index of the token that holds ``answer`` right after ``<answer>``, or None.

    ``token_texts`` are the decoded pieces of one completion. The answer token must start on a
    token boundary after the tag (blank tokens in between are allowed) and be exactly the digit.
    """
    text = ""
    seen_tag = False
    for k, piece in enumerate(token_texts):
        if seen_tag:
            if piece.strip() == "":
                text += piece
                continue
            return k if piece.strip() == str(answer) and piece == piece.lstrip() else None
        text += piece
        if ANSWER_OPEN in text:
            if not text.endswith(ANSWER_OPEN) and text[text.rindex(ANSWER_OPEN) + len(ANSWER_OPEN) :].strip():
                return None  # the tag and the answer share a token
            seen_tag = True
    return None


def fallback_text(completion_text: str) -> str:
    """The completion cut after its reasoning, with the answer prefix appended."""
    cut = completion_text.find(THINK_CLOSE)
    head = completion_text[:cut] if cut >= 0 else completion_text.split(ANSWER_OPEN)[0]
    return head + THINK_CLOSE + ANSWER_OPEN


def logits_at(
    model, inputs: dict, ids_NT: torch.Tensor, mask_NT: torch.Tensor, pos_N: torch.Tensor
) -> torch.Tensor:
    """Logits that predict completion token ``pos_N[n]`` of each row, ``(N, V)``.

    Runs the decoder once over ``[prompt ‖ completion]`` and applies the LM head to one hidden
    state per row only.
    """
    hf = unwrap(model)
    L = inputs["input_ids"].shape[1]
    input_ids = torch.cat([inputs["input_ids"], ids_NT], dim=1)  # (N, L+T)
    attention_mask = torch.cat([inputs["attention_mask"], mask_NT.to(inputs["attention_mask"])], dim=1)
    mm = torch.cat([inputs["mm_token_type_ids"], torch.zeros_like(ids_NT)], dim=1)
    extra = {k: inputs[k] for k in ("pixel_values", "image_grid_thw") if k in inputs}
    hidden = hf.model(
        input_ids=input_ids, attention_mask=attention_mask, mm_token_type_ids=mm, use_cache=False, **extra
    ).last_hidden_state  # (N, L+T, H)
    rows = torch.arange(ids_NT.shape[0], device=ids_NT.device)
    h_NH = hidden[rows, L + pos_N - 1]  # the state at the token *before* the answer predicts it
    return hf.lm_head(h_NH).float()  # (N, V)


def answer_positions(tokenizer, ids_NT: torch.Tensor, mask_NT: torch.Tensor, texts: list[str],
                     answer_values: tuple[int, ...]) -> torch.Tensor:  # fmt: skip
    """``(N,)`` index of each completion's answer token (``answer_token_index``), −1 where the
    completion is not well formed or its answer does not start a token."""
    pos = torch.full((ids_NT.shape[0],), -1, dtype=torch.long)
    for n, text in enumerate(texts):
        parsed = parse_completion(text, answer_values)
        if parsed.well_formed:
            n_real = int(mask_NT[n].sum())
            pieces = tokenizer.batch_decode([[i] for i in ids_NT[n, :n_real].tolist()])
            k = answer_token_index(pieces, parsed.answer)
            pos[n] = -1 if k is None else k
    return pos


def soft_scores(
    model,
    processor,
    inputs: dict,
    ids_NT: torch.Tensor,
    mask_NT: torch.Tensor,
    texts: list[str],
    answer_values: tuple[int, ...],
) -> tuple[torch.Tensor, torch.Tensor]:
    """Soft score of each completion: the expected answer value at its answer position.

    ``inputs`` has one prompt row per completion. For the pair task (answers (0, 1)) this is
    ``p(1 | C)``; for ratings it is ``E[r | C]``. Returns ``(scores_N, fallback_N)`` where
    ``fallback_N`` marks rows that needed the appended answer prefix.
    """
    logits_NA, fallback_N = answer_logits(model, processor, inputs, ids_NT, mask_NT, texts, answer_values)
    return answer_score(logits_NA, list(range(len(answer_values))), answer_values), fallback_N


@torch.no_grad()
def answer_logits(
    model,
    processor,
    inputs: dict,
    ids_NT: torch.Tensor,
    mask_NT: torch.Tensor,
    texts: list[str],
    answer_values: tuple[int, ...],
) -> tuple[torch.Tensor, torch.Tensor]:
    """The logits of the answer tokens at each completion's answer position, float ``(N, A)`` on the
    CPU in the order of ``answer_values``, read as ``soft_scores`` reads them (after the appended
    prefix for a completion without a usable answer); and ``fallback_N``. ``answer_score(logits_NA,
    range(A), answer_values)`` is the soft score, ``answer_choice`` the most probable answer."""
    tok = processor.tokenizer
    answer_ids = [tok.convert_tokens_to_ids(tok.tokenize(str(v))) for v in answer_values]
    assert all(len(a) == 1 for a in answer_ids), f"every answer must be one token, got {answer_ids}"
    answer_ids = [a[0] for a in answer_ids]

    N = ids_NT.shape[0]
    pos = answer_positions(tok, ids_NT, mask_NT, texts, answer_values)
    logits_NA = torch.empty(N, len(answer_ids))
    direct = (pos >= 0).nonzero().squeeze(1)
    if direct.numel():
        sub = select_rows(inputs, direct)
        logits = logits_at(model, sub, ids_NT[direct], mask_NT[direct], pos[direct].to(ids_NT.device))
        logits_NA[direct] = logits[:, answer_ids].cpu()
    fallback = (pos < 0).nonzero().squeeze(1)
    if fallback.numel():
        logits_NA[fallback] = _fallback_logits(model, tok, select_rows(inputs, fallback),
                                               [texts[i] for i in fallback], answer_ids)  # fmt: skip
    return logits_NA, pos < 0


def _fallback_logits(model, tok, inputs: dict, texts: list[str], answer_ids) -> torch.Tensor:
    """Rows without a usable answer token: re-tokenize ``fallback_text``; the answer logits at its end."""
    encoded = [tok.encode(fallback_text(t), add_special_tokens=False) for t in texts]
    T = max(len(e) for e in encoded)
    ids = torch.full((len(texts), T), tok.pad_token_id, dtype=torch.long)
    mask = torch.zeros((len(texts), T), dtype=torch.long)
    for n, e in enumerate(encoded):
        ids[n, : len(e)] = torch.tensor(e)
        mask[n, : len(e)] = 1
    device = inputs["input_ids"].device
    pos = mask.sum(dim=1)  # one past the last real token: the answer would go there
    logits = logits_at(model, inputs, ids.to(device), mask.to(device), pos.to(device))
    return logits[:, answer_ids].cpu()
