"""Shared fixtures: one tiny Qwen2.5-VL built offline per test session."""

from __future__ import annotations

import pytest
import torch
from PIL import Image

from models.qwen_vl import load_policy
from models.tiny import build_tiny


@pytest.fixture(scope="session")
def tiny_dir(tmp_path_factory):
    """A tiny Qwen2.5-VL folder (seed 0), built once for the whole session."""
    return build_tiny(tmp_path_factory.mktemp("tiny") / "model", seed=0)


@pytest.fixture(scope="session")
def tiny(tiny_dir):
    """``(model, processor)`` of the tiny folder, in eval mode. Tests must not change its weights."""
    torch.manual_seed(0)
    model, processor = load_policy(str(tiny_dir))
    model.eval()
    return model, processor


def solid(colour: str, size: int = 64) -> Image.Image:
    """A plain RGB square of one colour."""
    return Image.new("RGB", (size, size), colour)
