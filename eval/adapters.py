"""The judge in the call shapes diffusion-RL trainers use, in-process or through ``eval.client``.

| adapter | call | returns |
|---|---|---|
| ``FlowGRPOReward`` | ``reward_fn(images, prompts, metadata)`` (Flow-GRPO's ``rewards.py``) | ``(scores, info)``: a float32 array ``(B,)`` and a dict |
| ``PointwiseReward`` | ``model(prompt=[…], image=[…])`` (Flow-Factory's pointwise reward model) | ``RewardOutput(rewards (B,), extra_info)`` |
| ``GroupwiseReward`` | ``model(prompt=[…], image=[…])`` on one group (Flow-Factory's groupwise model) | ``RewardOutput(rewards (G,), extra_info)`` |

``images`` may be a float tensor ``(B, 3, H, W)`` in [0, 1] (a decoder's output; turned into
bytes as Flow-GRPO does, ``round(255 x)``), a uint8 array or tensor ``(B, H, W, 3)``, a list of
PIL images, or a list of ``(3, H, W)`` float tensors (Flow-Factory with ``use_tensor_inputs``).

What a score means follows the checkpoint's method (``eval.scale.checkpoint_method``): on a
rating checkpoint every image is one item and its reward is ``E[r | C]``, independent of the
others. On a pair checkpoint an image alone has no score, so ``FlowGRPOReward`` gathers the
images of each prompt into one group and ranks it (``anchor``: p(image ≻ anchor), the anchor
0.5), and ``PointwiseReward`` refuses it. Each item carries ``metadata["seed"]`` if given, else 0.

A *judge* is anything with ``method`` and ``soft_scores(items) -> list[list[float]]``:
``eval.batch.BatchScorer`` in-process, ``eval.client.JudgeClient`` over HTTP.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Protocol

import numpy as np
import torch
from PIL import Image

from data.images import normalize_image
from eval.batch import Item


class Judge(Protocol):
    method: str

    def soft_scores(self, items: list[Item]) -> list[list[float]]: ...


@dataclass
class RewardOutput:
    """Flow-Factory's ``RewardModelOutput`` fields: ``rewards (B,)`` and ``extra_info``."""

    rewards: torch.Tensor
    extra_info: dict = field(default_factory=dict)


def as_pil_images(images) -> list[Image.Image]:
    """PIL RGB images from any of the accepted forms (see the module doc), normalised for the processor."""
    if isinstance(images, torch.Tensor) and images.is_floating_point():
        if images.ndim != 4 or images.shape[1] != 3:
            raise ValueError(
                f"a float image tensor must be (B, 3, H, W) in [0, 1], got {tuple(images.shape)}"
            )
        images = (images.detach() * 255).round().clamp(0, 255).to(torch.uint8).cpu().numpy()  # Flow-GRPO's
        images = images.transpose(0, 2, 3, 1)  # (B, H, W, 3)
    elif isinstance(images, torch.Tensor):
        images = images.detach().cpu().numpy()
    if isinstance(images, np.ndarray):
        if images.dtype != np.uint8 or images.ndim != 4 or images.shape[-1] != 3:
            raise ValueError(f"an image array must be uint8 (B, H, W, 3), got {images.dtype} {images.shape}")
        return [Image.fromarray(a) for a in images]
    if not isinstance(images, (list, tuple)):
        raise ValueError(f"images: expected a tensor, an array or a list, got {type(images).__name__}")
    out = []
    for i, im in enumerate(images):
        if isinstance(im, torch.Tensor):
            out.append(as_pil_images(im[None])[0])
        elif isinstance(im, Image.Image):
            out.append(normalize_image(im, source=f"image {i}"))
        else:
            raise ValueError(
                f"image {i}: expected a PIL image or a (3, H, W) tensor, got {type(im).__name__}"
            )
    return out


def metadata_seed(metadata) -> int:
    """The items' seed: ``metadata["seed"]`` when the trainer passes one dict with it, else 0."""
    return int(metadata["seed"]) if isinstance(metadata, dict) and "seed" in metadata else 0


def group_by_prompt(prompts: list[str]) -> list[list[int]]:
    """Indices of equal prompts, groups in order of first appearance."""
    groups: dict[str, list[int]] = {}
    for i, p in enumerate(prompts):
        groups.setdefault(p, []).append(i)
    return list(groups.values())


def flow_grpo_scores(judge: Judge, images, prompts, metadata=None) -> tuple[np.ndarray, dict]:
    """``reward_fn(images, prompts, metadata) -> (scores, info)`` with ``judge`` (see the module doc)."""
    pil, prompts = as_pil_images(images), list(prompts)
    if len(pil) != len(prompts):
        raise ValueError(f"{len(pil)} images but {len(prompts)} prompts")
    seed = metadata_seed(metadata)
    if judge.method == "rating":
        groups = [[i] for i in range(len(pil))]
    else:
        groups = group_by_prompt(prompts)
    items = [Item(prompts[g[0]], [pil[i] for i in g], seed) for g in groups]
    scores = np.zeros(len(pil), dtype=np.float32)
    for g, soft in zip(groups, judge.soft_scores(items)):
        scores[g] = soft
    return scores, {"method": judge.method, "groups": len(groups)}


class FlowGRPOReward:
    """Flow-GRPO's reward function: ``scores, info = FlowGRPOReward(judge)(images, prompts, metadata)``."""

    def __init__(self, judge: Judge) -> None:
        self.judge = judge

    def __call__(self, images, prompts, metadata=None) -> tuple[np.ndarray, dict]:
        return flow_grpo_scores(self.judge, images, prompts, metadata)


class PointwiseReward:
    """Flow-Factory's pointwise reward: ``PointwiseReward(judge)(prompt=[…], image=[…]).rewards``, one
    independent ``E[r | C]`` per image. Needs a rating checkpoint."""

    def __init__(self, judge: Judge, seed: int = 0) -> None:
        if judge.method != "rating":
            raise ValueError(f"a {judge.method} judge has no pointwise score: use GroupwiseReward")
        self.judge, self.seed = judge, seed

    def __call__(self, prompt: list[str], image=None, **kwargs) -> RewardOutput:
        pil = as_pil_images(image)
        if len(pil) != len(prompt):
            raise ValueError(f"{len(pil)} images but {len(prompt)} prompts")
        items = [Item(p, [im], self.seed) for p, im in zip(prompt, pil)]
        rewards = [soft for (soft,) in self.judge.soft_scores(items)]
        return RewardOutput(torch.tensor(rewards, dtype=torch.float32))


class GroupwiseReward:
    """Flow-Factory's groupwise reward: ``GroupwiseReward(judge)(prompt=[…], image=[…]).rewards`` for
    the images of one prompt, scored together by the checkpoint's method (e.g. anchor ranking)."""

    def __init__(self, judge: Judge, seed: int = 0) -> None:
        self.judge, self.seed = judge, seed

    def __call__(self, prompt: list[str], image=None, **kwargs) -> RewardOutput:
        pil = as_pil_images(image)
        if len(pil) != len(prompt) or not pil:
            raise ValueError(f"{len(pil)} images but {len(prompt)} prompts")
        if len(set(prompt)) != 1:
            raise ValueError(f"a group shares one prompt; got {len(set(prompt))} different ones")
        (soft,) = self.judge.soft_scores([Item(prompt[0], pil, self.seed)])
        return RewardOutput(torch.tensor(soft, dtype=torch.float32), {"method": self.judge.method})
