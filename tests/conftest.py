"""Shared fixtures: one tiny Qwen2.5-VL built offline per test session."""

from __future__ import annotations

import copy
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from PIL import Image

from models.qwen_vl import load_policy
from models.tiny import build_like, build_tiny

# The project's shared fixtures live beside the checkout (``../shared/fixtures``, as on CI);
# a copy under ``tests/fixtures`` (e.g. vendored into a fork) is used first.
REPO = Path(__file__).resolve().parents[1]
FIXTURE_DIRS = (REPO / "tests" / "fixtures", REPO.parent / "shared" / "fixtures")


def shared_fixture(name: str) -> Path:
    """The fixture file or folder ``name``, found relative to the checkout; skips the test if absent.

    Never an absolute path: the project may live anywhere. ``pytest -ra`` prints the skip reason.
    """
    for folder in FIXTURE_DIRS:
        if (folder / name).exists():
            return folder / name
    pytest.skip(f"fixture {name} not found in {' or '.join(str(d) for d in FIXTURE_DIRS)} "
                "(the project's shared/fixtures folder beside the checkout)")  # fmt: skip


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


@pytest.fixture(scope="module")
def one_thread():
    """Tiny matrices gain nothing from threads; on a shared 2-core machine they cost 5-25×."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def biased_towards_eos(model, processor, bias: float):
    """A copy of ``model`` whose LM head adds ``bias`` to the end-of-turn logit, so completions
    end at varied lengths and the eos / padding / min_new_tokens paths run."""
    model = copy.deepcopy(model)
    head = model.lm_head
    biased = torch.nn.Linear(head.in_features, head.out_features, bias=True)
    biased.weight.data.copy_(head.weight.data)
    biased.bias.data.zero_()
    biased.bias.data[processor.tokenizer.convert_tokens_to_ids("<|im_end|>")] = bias
    model.lm_head = biased
    return model.eval()


def solid(colour: str, size: int = 64) -> Image.Image:
    """A plain RGB square of one colour."""
    return Image.new("RGB", (size, size), colour)


@pytest.fixture(scope="session")
def synthetic_ir(tmp_path_factory):
    """A small synthetic ImageRewardDB folder (image-only colour task, seed 0)."""
    from data.synthetic import write_imagereward

    out = tmp_path_factory.mktemp("synthetic") / "imagereward"
    write_imagereward(out, prompts=16, seed=0)
    return out


@pytest.fixture(scope="session")
def cold_tiny_dir(tiny_dir, synthetic_ir, tmp_path_factory):
    """The tiny model after a short cold start (the answer format, ratings from a random taste):
    well-formed answers that vary, so rewards vary. Too short to learn which image gets which
    rating; ``tests/test_demo.py`` checks that the demo's longer cold start does."""
    from data.imagereward import read_train
    from grpo.coldstart import cold_start

    out = tmp_path_factory.mktemp("cold") / "model"
    return cold_start(str(tiny_dir), read_train(synthetic_ir), str(out), steps=60, batch_size=8, lr=2e-3,
                      progress=False)  # fmt: skip


def torchrun(out: Path, *overrides: str, model, data, check: bool = True) -> subprocess.CompletedProcess:
    """``torchrun --nproc_per_node=2 -m grpo.train experiments/tiny.yaml`` for 3 short steps (CPU, gloo)."""
    args = [
        f"model.name_or_path={model}", f"data.root={data}", f"train.output_dir={out}", "model.dtype=float32",
        "train.device=cpu", "train.steps=3", "train.lr=1e-3", "train.warmup_steps=1", "grpo.group_size=4",
        "grpo.prompts_per_step=2", "grpo.max_new_tokens=24", "grpo.minibatch_size=4", "grpo.kl_coef=0.04",
        "eval.every=0",
    ]  # fmt: skip
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", "-m", "grpo.train",
           "experiments/tiny.yaml", *args, *overrides]  # fmt: skip
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=600, env=env, cwd=REPO)
    assert not check or proc.returncode == 0, proc.stderr[-4000:]
    return proc


@pytest.fixture(scope="session")
def fsdp_run(cold_tiny_dir, synthetic_ir, tmp_path_factory):
    """FSDP on 2 ranks, 3 steps, a sharded checkpoint after every step (``ROOT/fsdp``). Tests copy
    what they change."""
    root = tmp_path_factory.mktemp("fsdp")
    proc = torchrun(root / "fsdp", "train.strategy=fsdp", "train.save_every=1", "train.keep_last=3",
                    "train.log_completions=8", model=cold_tiny_dir, data=synthetic_ir)  # fmt: skip
    return root, proc


@pytest.fixture(scope="session")
def real_files():
    """The real Qwen2.5-VL-7B-Instruct non-weight files (``../shared/fixtures``), or a skip."""
    return shared_fixture("qwen2.5-vl-7b-instruct")


@pytest.fixture(scope="session")
def like_dir(real_files, tmp_path_factory):
    """A model of the real Qwen2.5-VL-7B-Instruct configuration shrunk in size (``models.tiny --like``):
    vocabulary 152,064, the real tokenizer, chat template, generation and processor files."""
    return build_like(tmp_path_factory.mktemp("like") / "model", real_files, seed=0)


@pytest.fixture(scope="session")
def like(like_dir):
    """``(model, processor)`` of ``like_dir`` in eval mode. Tests must not change its weights."""
    torch.manual_seed(0)
    model, processor = load_policy(str(like_dir))
    return model.eval(), processor


VISION_TOKEN_NAMES = (
    "<|vision_start|>",
    "<|vision_end|>",
    "<|vision_pad|>",
    "<|image_pad|>",
    "<|video_pad|>",
)


def vision_tokens_by_name(processor) -> list[int]:
    """The ids of the five vision special tokens, looked up by name in the tokenizer: the tests'
    own account of what ``models.qwen_vl.vision_token_ids`` reads from the config."""
    return processor.tokenizer.convert_tokens_to_ids(list(VISION_TOKEN_NAMES))


def sampled_logprobs(logits_NTV: torch.Tensor, ids_NT: torch.Tensor, processor, temperature: float = 1.0):
    """log p(y_t) under the distribution sampling draws from: softmax(f / τ) without the five vision
    special tokens, ``(N, T)``. ``logits_NTV`` are raw."""
    z = logits_NTV.float() / temperature
    z[..., vision_tokens_by_name(processor)] = -torch.inf
    return torch.log_softmax(z, -1).gather(-1, ids_NT.unsqueeze(-1)).squeeze(-1)
