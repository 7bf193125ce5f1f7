"""Group sampling and the rollout buffer.

One GRPO step samples ``G`` completions for each of ``B`` prompts
(``models.sampling.sample_completions``: by default, ``grpo.share_prefix``, each prompt is
prefilled once and our own loop samples its G continuations), scores them, and keeps everything
the update passes need in a ``RolloutBuffer``:

| field          | shape   | meaning |
|----------------|---------|---------|
| inputs         | B rows  | left-padded prompt tokens + packed ``pixel_values (P, D)`` / ``image_grid_thw (I, 3)`` |
| ids_NT         | (N, T)  | completion tokens, right padded; row n belongs to prompt n // G |
| mask_NT        | (N, T)  | 1 on real completion tokens (the end-of-turn token included) |
| rewards_N      | (N,)    | weighted total reward; ``components`` holds each unweighted part |
| advantages_N   | (N,)    | group-normalised rewards |
| old_logp_NT    | (N, T)  | log π_θold, stored only when μ > 1 |
| ref_logp_NT    | (N, T)  | log π_ref, stored only when β > 0 |
| answer_pos_N   | (N,)    | index of the answer token in each completion, −1 where there is none |

``N = B·G``. Minibatches are sets of completion rows; their prompt rows (and so their packed
images) are sliced from ``inputs`` with ``models.qwen_vl.select_rows``, never by position in
``pixel_values``. ``concat_groups`` joins chosen groups of several rollouts into one buffer
(dynamic sampling, ``grpo.dynamic_sampling``).
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from PIL import Image

from common.config import SamplingSpec
from data.prompts import messages_for
from data.types import TrainSample
from models.logprobs import completion_logprobs
from models.qwen_vl import build_inputs, group_rows, render_prompt, select_rows


@dataclass
class RolloutBuffer:
    inputs: dict[str, torch.Tensor]
    group_size: int
    ids_NT: torch.Tensor
    mask_NT: torch.Tensor
    texts: list[str]
    truncated_N: torch.Tensor
    samples: list[TrainSample]
    rewards_N: torch.Tensor | None = None
    components: dict[str, torch.Tensor] = field(default_factory=dict)
    advantages_N: torch.Tensor | None = None
    old_logp_NT: torch.Tensor | None = None
    ref_logp_NT: torch.Tensor | None = None
    answer_pos_N: torch.Tensor | None = None
    share_prefix: bool = SamplingSpec.share_prefix  # each prompt once per minibatch (Minibatch.prompt_rows)

    @property
    def num_completions(self) -> int:
        return self.ids_NT.shape[0]

    @property
    def prompt_rows_N(self) -> torch.Tensor:
        """The prompt (row of ``inputs`` and of ``samples``) of each completion, ``(N,)``."""
        return group_rows(self.num_completions // self.group_size, self.group_size)

    def targets_N(self) -> list[int]:
        """The target of each completion: its prompt's human answer, repeated G times."""
        return [self.samples[b].target for b in self.prompt_rows_N.tolist()]

    def answer_logprobs(self, rows: torch.Tensor, logp_NT: torch.Tensor) -> torch.Tensor:
        """log π of the sampled answer token of each completion in ``rows`` that has one, from the
        minibatch's per-token log-probs ``logp_NT``; the mean of their negatives estimates the
        entropy of the answer (the answers are samples of π)."""
        if self.answer_pos_N is None:
            return logp_NT.new_zeros(0)
        pos = self.answer_pos_N[rows].to(logp_NT.device)
        have = (pos >= 0).nonzero().squeeze(1)
        return logp_NT[have, pos[have]].float()

    def minibatches(self, size: int) -> Iterator[Minibatch]:
        """Consecutive slices of ``size`` completions, with their prompt rows and images."""
        for start in range(0, self.num_completions, size):
            rows = torch.arange(start, min(start + size, self.num_completions))
            yield self.minibatch(rows)

    def minibatch(self, rows: torch.Tensor) -> Minibatch:
        def pick(t):
            return None if t is None else t[rows]

        prompts, prompt_rows = self.prompt_rows_N[rows], None
        if self.share_prefix:  # each prompt once; completion i continues prompt row prompt_rows[i]
            prompts, prompt_rows = torch.unique_consecutive(prompts, return_inverse=True)
        return Minibatch(
            rows=rows,
            inputs=select_rows(self.inputs, prompts),
            prompt_rows=prompt_rows,
            ids_NT=self.ids_NT[rows],
            mask_NT=self.mask_NT[rows],
            advantages_N=pick(self.advantages_N),
            old_logp_NT=pick(self.old_logp_NT),
            ref_logp_NT=pick(self.ref_logp_NT),
        )


@dataclass
class Minibatch:
    rows: torch.Tensor
    inputs: dict[str, torch.Tensor]
    prompt_rows: torch.Tensor | None  # None: one prompt row per completion; else its row in inputs
    ids_NT: torch.Tensor
    mask_NT: torch.Tensor
    advantages_N: torch.Tensor | None
    old_logp_NT: torch.Tensor | None
    ref_logp_NT: torch.Tensor | None


def encode_samples(
    processor,
    samples: list[TrainSample],
    images: list[list[Image.Image]],
    rating_values: tuple[int, ...] | None,
) -> dict[str, torch.Tensor]:
    """The chat prompts of B training samples with their decoded images, as one padded batch."""
    texts = [
        render_prompt(processor, messages_for(s.task, s.prompt, len(ims), rating_values or ()))
        for s, ims in zip(samples, images, strict=True)
    ]
    return build_inputs(processor, texts, images)


@torch.no_grad()
def buffer_logprobs(model, buffer: RolloutBuffer, minibatch_size: int, temperature: float) -> torch.Tensor:
    """log π(y_t | …) of every buffered completion under ``model``, without gradients, (N, T)."""
    out = torch.zeros(buffer.ids_NT.shape, dtype=torch.float32, device=buffer.ids_NT.device)
    for mb in buffer.minibatches(minibatch_size):
        logp_NT = completion_logprobs(model, mb.inputs, mb.ids_NT, mb.mask_NT, temperature, mb.prompt_rows)
        out[mb.rows] = logp_NT.float()
    return out


def concat_groups(parts: list[tuple[RolloutBuffer, list[int]]], pad_id: int) -> RolloutBuffer:
    """One buffer holding chosen groups of several rollouts (dynamic sampling's refilled batch).

    For each ``(buffer, groups)`` in turn: the prompt rows ``groups`` (with their packed images,
    ``models.qwen_vl.select_rows``) and their G completions each, with rewards and components.
    Prompts are left padded (``pad_id``, attention 0) and completions right padded to the longest,
    as one sampling call would have padded them. Advantages and log-probs are computed after.
    """
    G = parts[0][0].group_size
    prompts, ids, masks, texts, truncated, samples, rewards = [], [], [], [], [], [], []
    components = {k: [] for k in parts[0][0].components}
    for buf, groups in parts:
        if not groups:
            continue
        rows = (torch.tensor(groups)[:, None] * G + torch.arange(G)).flatten()  # (n·G,) completion rows
        prompts.append(select_rows(buf.inputs, groups))
        ids.append(buf.ids_NT[rows])
        masks.append(buf.mask_NT[rows])
        texts += [buf.texts[r] for r in rows.tolist()]
        truncated.append(buf.truncated_N[rows])
        samples += [buf.samples[b] for b in groups]
        rewards.append(buf.rewards_N[rows])
        for k in components:
            components[k].append(buf.components[k][rows])
    T = max(t.shape[1] for t in ids)
    L = max(p["input_ids"].shape[1] for p in prompts)

    def right(t, value):
        return F.pad(t, (0, T - t.shape[1]), value=value)

    def left(t, value):
        return F.pad(t, (L - t.shape[1], 0), value=value)

    inputs = {
        "input_ids": torch.cat([left(p["input_ids"], pad_id) for p in prompts]),  # (B, L)
        "attention_mask": torch.cat([left(p["attention_mask"], 0) for p in prompts]),
        "mm_token_type_ids": torch.cat([left(p["mm_token_type_ids"], 0) for p in prompts]),
    }
    if "pixel_values" in prompts[0]:
        inputs["pixel_values"] = torch.cat([p["pixel_values"] for p in prompts])  # (P, D)
        inputs["image_grid_thw"] = torch.cat([p["image_grid_thw"] for p in prompts])  # (I, 3)
    return RolloutBuffer(
        inputs, G, torch.cat([right(t, pad_id) for t in ids]), torch.cat([right(m, 0) for m in masks]), texts,
        torch.cat(truncated), samples, rewards_N=torch.cat(rewards),
        components={k: torch.cat(v) for k, v in components.items()}, share_prefix=parts[0][0].share_prefix,
    )  # fmt: skip
