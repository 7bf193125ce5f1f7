"""Foundation: the tiny model builder, inputs, sampling and per-token log-probs."""

from __future__ import annotations

import hashlib
import json

import pytest
import torch
from conftest import sampled_logprobs, solid, vision_tokens_by_name

from data.prompts import messages_for
from models.logprobs import completion_logprobs
from models.qwen_vl import build_inputs, load_policy, render_prompt, repeat_inputs, select_rows, token_ids
from models.sampling import sample_completions
from models.tiny import QWEN_SPECIAL_TOKENS, build_tiny

SCALE = (1, 2, 3, 4, 5, 6, 7)


def _digest(folder):
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(folder.iterdir())}


def test_tiny_build_is_deterministic(tiny_dir, tmp_path):
    again = build_tiny(tmp_path / "again", seed=0)
    assert _digest(again) == _digest(tiny_dir)
    other = build_tiny(tmp_path / "other", seed=1)
    assert _digest(other)["model.safetensors"] != _digest(tiny_dir)["model.safetensors"]


def test_folder_looks_like_a_real_checkpoint(tiny_dir, tiny):
    _, processor = tiny
    names = {p.name for p in tiny_dir.iterdir()}
    assert {"config.json", "model.safetensors", "tokenizer.json", "processor_config.json"} <= names
    assert (
        json.loads((tiny_dir / "processor_config.json").read_text())["processor_class"]
        == "Qwen2_5_VLProcessor"
    )
    config = json.loads((tiny_dir / "config.json").read_text())
    assert config["architectures"] == ["Qwen2_5_VLForConditionalGeneration"]
    ids = processor.tokenizer.convert_tokens_to_ids(list(QWEN_SPECIAL_TOKENS))
    assert ids == list(range(ids[0], ids[0] + len(ids))), "special tokens keep Qwen's order"
    assert config["image_token_id"] == processor.tokenizer.convert_tokens_to_ids("<|image_pad|>")


def test_digits_are_single_tokens(tiny):
    _, processor = tiny
    ids = token_ids(processor, [str(d) for d in range(10)])
    assert len(set(ids)) == 10
    with pytest.raises(ValueError, match="tokens"):
        token_ids(processor, ["10"])


@pytest.mark.parametrize("n_images,task", [(1, "rating"), (2, "pair")])
def test_chat_template_renders_one_vision_block_per_image(tiny, n_images, task):
    _, processor = tiny
    text = render_prompt(processor, messages_for(task, "a red circle", n_images, SCALE))
    assert text.count("<|vision_start|><|image_pad|><|vision_end|>") == n_images
    assert text.startswith("<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n<|im_start|>user\n")
    assert text.endswith("<|im_end|>\n<|im_start|>assistant\n")
    inputs = build_inputs(processor, [text], [[solid("red")] * n_images])
    # 64×64 → 56×56 → a 4×4 patch grid → 2×2 merged tokens = 4 image tokens per image.
    assert int(inputs["mm_token_type_ids"].sum()) == 4 * n_images
    assert inputs["image_grid_thw"].tolist() == [[1, 4, 4]] * n_images


def _batch(processor, examples):
    texts = [render_prompt(processor, messages_for(t, p, len(ims), SCALE)) for t, p, ims in examples]
    return build_inputs(processor, texts, [ims for _, _, ims in examples])


ONE = [("rating", "a red circle", [solid("red")])]
TWO = [("pair", "a blue square", [solid("blue"), solid("green", 96)])]
MIXED = [
    ("rating", "a cat", [solid("yellow")]),
    ("pair", "a large green triangle on a dark background", [solid("blue", 120), solid("red")]),
    ("rating", "a dog in the city at night", [solid("white", 80)]),
]


@pytest.mark.parametrize("examples", [ONE, TWO, MIXED], ids=["one-image", "two-images", "mixed-left-padded"])
def test_reforward_logprobs_match_generate(tiny, examples):
    model, processor = tiny
    inputs = _batch(processor, examples)
    torch.manual_seed(0)
    G = 3
    comp, logits_NTV = sample_completions(
        model, processor, inputs, G, max_new_tokens=16, return_scores=True, share_prefix=False
    )
    assert comp.ids_NT.shape[0] == len(examples) * G
    generate_logp = sampled_logprobs(logits_NTV, comp.ids_NT, processor)
    ours = completion_logprobs(model, repeat_inputs(inputs, G), comp.ids_NT, comp.mask_NT)
    real = comp.mask_NT.bool()
    torch.testing.assert_close(ours[real], generate_logp[real], atol=1e-5, rtol=0)


def test_sampling_never_emits_vision_tokens_and_masks_after_eos(tiny):
    model, processor = tiny
    inputs = _batch(processor, MIXED)
    torch.manual_seed(1)
    comp = sample_completions(model, processor, inputs, 4, max_new_tokens=24, share_prefix=False)
    vision = torch.tensor(processor.tokenizer.convert_tokens_to_ids(["<|image_pad|>", "<|vision_start|>"]))
    assert not torch.isin(comp.ids_NT, vision).any()
    eos = processor.tokenizer.convert_tokens_to_ids("<|im_end|>")
    for ids, mask in zip(comp.ids_NT, comp.mask_NT):
        n = int(mask.sum())
        assert mask[:n].all() and not mask[n:].any(), "mask is a prefix"
        assert eos not in ids[: n - 1].tolist(), "nothing real follows an end of turn"


def test_select_rows_slices_packed_images(tiny):
    _, processor = tiny
    inputs = _batch(processor, MIXED)
    sub = select_rows(inputs, [1, 1, 2])
    again = _batch(processor, [MIXED[1], MIXED[1], MIXED[2]])
    assert sub["image_grid_thw"].tolist() == again["image_grid_thw"].tolist()
    torch.testing.assert_close(sub["pixel_values"], again["pixel_values"])


def test_gradients_reach_the_vision_tower(tiny_dir):
    model, processor = load_policy(str(tiny_dir))
    inputs = _batch(processor, ONE)
    ids = torch.tensor([processor.tokenizer.encode("<think>ok</think><answer>5</answer>")])
    logp = completion_logprobs(model, inputs, ids, torch.ones_like(ids))
    logp.sum().backward()
    vision_grads = [p.grad for n, p in model.named_parameters() if "visual" in n]
    assert vision_grads and all(g is not None for g in vision_grads)
    assert sum(g.abs().sum() for g in vision_grads) > 0


def test_load_policy_dtype(tiny_dir):
    model, _ = load_policy(str(tiny_dir), dtype="bfloat16")
    assert next(model.parameters()).dtype == torch.bfloat16


def test_logprobs_leave_out_the_tokens_sampling_never_draws(tiny):
    # Sampling suppresses the five vision tokens, so the scored distribution must be the softmax
    # without them: the log-prob of a token rises by −log(1 − p_vision) over the full softmax.
    from models.qwen_vl import vision_token_ids

    model, processor = tiny
    assert vision_token_ids(model) == vision_tokens_by_name(processor)
    inputs = _batch(processor, ONE)
    ids = torch.tensor([processor.tokenizer.encode("<think>ok</think><answer>5</answer>")])
    mask = torch.ones_like(ids)
    with torch.no_grad():
        ours = completion_logprobs(model, inputs, ids, mask)
        L = inputs["input_ids"].shape[1]
        full = {**inputs, "input_ids": torch.cat([inputs["input_ids"], ids], 1),
                "attention_mask": torch.ones(1, L + ids.shape[1], dtype=torch.long),
                "mm_token_type_ids": torch.cat([inputs["mm_token_type_ids"], torch.zeros_like(ids)], 1)}  # fmt: skip
        logits = model(**full).logits[0, L - 1 : -1].float()  # (T, V): position t predicts token t
    p_full = torch.log_softmax(logits, -1)
    p_vision = p_full[:, vision_token_ids(model)].exp().sum(-1)  # (T,)
    expected = p_full.gather(-1, ids[0, :, None]).squeeze(-1) - torch.log1p(-p_vision)
    assert p_vision.min() > 1e-4, "the random tiny model gives the vision tokens visible mass"
    torch.testing.assert_close(ours[0], expected, atol=1e-5, rtol=0)
