"""The real Qwen2.5-VL-7B-Instruct files: tokenizer, chat template, generation defaults,
image processor, on a model of the real configuration shrunk only in size (``models.tiny --like``).

Random weights make the outputs meaningless, never the plumbing: these tests check what the tiny
preset's own tokenizer and generation config cannot, e.g. that ``generate()`` does not inherit
``repetition_penalty`` 1.05 from the checkpoint. They skip where ``../shared`` is absent.
"""

from __future__ import annotations

import json
import math
import shutil
from pathlib import Path

import pytest
import torch
from conftest import biased_towards_eos, sampled_logprobs, solid, vision_tokens_by_name
from PIL import Image

from data.prompts import messages_for
from models.logprobs import completion_logprobs
from models.qwen_vl import (
    DEFAULT_MAX_PIXELS,
    build_inputs,
    image_token_count,
    load_policy,
    load_processor,
    render_prompt,
    repeat_inputs,
    set_pixel_bounds,
    token_ids,
)
from models.sampling import (
    draw_tokens_as_generate,
    neutral_generation_defaults,
    sample_completions,
    sampling_config,
)
from models.soft_head import soft_scores
from models.tiny import CHECKPOINT_TEXT_FILES, QWEN_CHAT_TEMPLATE

SCALE = (1, 2, 3, 4, 5, 6, 7)


def _prompt(processor, task: str, images: list[Image.Image]) -> dict[str, torch.Tensor]:
    text = render_prompt(processor, messages_for(task, "a red fox in the snow", len(images), SCALE))
    return build_inputs(processor, [text], [images])


def test_like_keeps_the_real_configuration_but_its_size(like_dir, real_files):
    real = json.loads((real_files / "config.json").read_text())
    ours = json.loads((like_dir / "config.json").read_text())
    text, vision = ours["text_config"], ours["vision_config"]
    assert text["vocab_size"] == real["vocab_size"] == 152_064
    for key in ("image_token_id", "video_token_id", "vision_start_token_id", "vision_end_token_id"):
        assert ours[key] == real[key], key
    assert (text["bos_token_id"], text["eos_token_id"]) == (real["bos_token_id"], real["eos_token_id"])
    assert (text["hidden_size"], text["num_hidden_layers"]) == (128, 2)
    assert (text["num_attention_heads"], text["num_key_value_heads"]) == (4, 2)
    # head_dim 32: the real [16, 24, 24] (sum 64 = 128 / 2) scaled by 1/4 to sum 16
    assert text["rope_parameters"]["mrope_section"] == [4, 6, 6]
    assert text["rope_parameters"]["rope_theta"] == real["rope_theta"]
    assert vision["depth"] == 2 and vision["fullatt_block_indexes"] == [1]
    for key in ("patch_size", "spatial_merge_size", "temporal_patch_size", "window_size"):
        assert vision[key] == real["vision_config"][key], key
    assert ours["tie_word_embeddings"] is False
    for name in CHECKPOINT_TEXT_FILES:  # copied unchanged, after save_pretrained wrote its own
        if (real_files / name).is_file():
            assert (like_dir / name).read_bytes() == (real_files / name).read_bytes(), name


def test_our_chat_template_is_the_real_one(real_files):
    real = json.loads((real_files / "chat_template.json").read_text())["chat_template"]
    assert QWEN_CHAT_TEMPLATE == real


def test_answers_are_single_tokens_and_the_soft_head_reads_right_before_them(like):
    model, processor = like
    assert token_ids(processor, [str(d) for d in range(10)]) == list(range(15, 25))  # real Qwen ids
    inputs = _prompt(processor, "rating", [solid("red", 64)])
    text = "<think>The fox is sharp.</think><answer>6</answer>"
    ids = torch.tensor([processor.tokenizer.encode(text, add_special_tokens=False)])
    k = ids[0].tolist().index(token_ids(processor, ["6"])[0])  # the answer digit's position
    score, fallback = soft_scores(model, processor, inputs, ids, torch.ones_like(ids), [text], SCALE)
    assert not fallback.any(), "a well-formed answer is read in place"
    # The same number by hand: one plain forward, the logits at the token *before* the digit.
    L = inputs["input_ids"].shape[1]
    full = {**inputs, "input_ids": torch.cat([inputs["input_ids"], ids], 1),
            "attention_mask": torch.ones(1, L + ids.shape[1], dtype=torch.long),
            "mm_token_type_ids": torch.cat([inputs["mm_token_type_ids"], torch.zeros_like(ids)], 1)}  # fmt: skip
    with torch.no_grad():
        logits = model(**full).logits[0, L + k - 1]  # (V,)
    p = torch.softmax(logits[list(range(16, 23))].float(), -1)  # digits 1…7 are ids 16…22
    torch.testing.assert_close(score, (p * torch.arange(1.0, 8.0)).sum().reshape(1), atol=1e-5, rtol=0)


@pytest.mark.parametrize("task,n_images", [("rating", 1), ("pair", 2)])
def test_real_template_renders_one_vision_block_per_image(like, task, n_images):
    _, processor = like
    images = [solid("red", 64), solid("blue", 96)][:n_images]
    inputs = _prompt(processor, task, images)
    ids = inputs["input_ids"][0].tolist()
    tok = processor.tokenizer
    start, pad = tok.convert_tokens_to_ids(["<|vision_start|>", "<|image_pad|>"])
    assert ids.count(start) == n_images
    expected = sum(image_token_count(processor, im) for im in images)
    assert ids.count(pad) == expected == int(inputs["image_grid_thw"].prod(dim=1).sum()) // 4
    text = tok.decode(ids)
    assert text.startswith("<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n<|im_start|>user\n")
    assert text.endswith("<|im_end|>\n<|im_start|>assistant\n")


def test_load_policy_reads_the_vision_template_of_the_first_upload(like_dir, real_files, tmp_path):
    # January 2025: tokenizer_config.json held the text-only Qwen2.5 template, chat_template.json the
    # vision one. Reading only the tokenizer's failed ("can only concatenate str (not "list") to str").
    old = tmp_path / "revision-2025-01"
    shutil.copytree(like_dir, old)
    for f in (real_files / "revision-2025-01").iterdir():
        shutil.copyfile(f, old / f.name)
    from transformers import AutoTokenizer

    assert "<|image_pad|>" not in AutoTokenizer.from_pretrained(old).chat_template, "the fixture's trap"
    processor = load_processor(str(old))
    inputs = _prompt(processor, "pair", [solid("red"), solid("blue")])
    start = processor.tokenizer.convert_tokens_to_ids("<|vision_start|>")
    assert inputs["input_ids"][0].tolist().count(start) == 2


def test_image_token_counts_under_the_real_processor_and_our_cap(like_dir):
    processor = load_processor(str(like_dir))
    assert processor.image_processor.size["longest_edge"] == 12_845_056  # the real cap: 16,384 tokens
    photo = Image.new("RGB", (4000, 3000), "gray")
    assert image_token_count(processor, photo) == 15_301
    set_pixel_bounds(processor, max_pixels=DEFAULT_MAX_PIXELS)
    assert image_token_count(processor, photo) == 494
    inputs = build_inputs(processor, ["<|vision_start|><|image_pad|><|vision_end|>"], [[photo]])
    pad = processor.tokenizer.convert_tokens_to_ids("<|image_pad|>")
    assert int((inputs["input_ids"] == pad).sum()) == 494, "the processor itself honours the cap"


@pytest.fixture(scope="module")
def eos_prone_like(like):
    """The real-config model with +10 on the <|im_end|> logit (~13% per step), so completions end at
    varied lengths, and a logit a repetition penalty would change (<|im_end|> is in every prompt)."""
    model, processor = like
    return biased_towards_eos(model, processor, 10.0), processor


@pytest.mark.parametrize("temperature", [1.0, 0.7])
def test_generate_samples_the_plain_softmax_whatever_the_checkpoint_says(eos_prone_like, temperature):
    # The real generation_config.json sets repetition_penalty 1.05 and temperature 1e-6, and
    # generate() fills every field left unset from it. The scores generate() samples from (after
    # its logits processors) must be logits / temperature with only the vision tokens suppressed.
    # Checked by hand: without neutral_generation_defaults and repetition_penalty=1 this fails.
    model, processor = eos_prone_like
    assert model.generation_config.repetition_penalty == 1.05 and model.generation_config.temperature == 1e-6
    inputs = _prompt(processor, "rating", [solid("red", 64)])
    cfg = sampling_config(model, processor, 8, temperature)
    cfg.num_return_sequences, cfg.return_dict_in_generate, cfg.output_scores, cfg.output_logits = (
        2,
        True,
        True,
        True,
    )
    torch.manual_seed(0)
    with neutral_generation_defaults(model):
        out = model.generate(**inputs, generation_config=cfg)
    assert model.generation_config.repetition_penalty == 1.05, "the checkpoint's config is left as it was"
    processed, raw = torch.stack(out.scores, 1).float(), torch.stack(out.logits, 1).float()  # (N, T, V)
    allowed = torch.ones(raw.shape[-1], dtype=torch.bool)
    allowed[vision_tokens_by_name(processor)] = False
    assert torch.isinf(processed[..., ~allowed]).all()
    torch.testing.assert_close(torch.log_softmax(processed[..., allowed], -1),
                               torch.log_softmax(raw[..., allowed] / temperature, -1), atol=1e-5, rtol=0)  # fmt: skip


@pytest.mark.parametrize("temperature", [1.0, 0.7])
def test_generate_and_our_sampling_loop_draw_the_same_tokens(eos_prone_like, temperature):
    # Same seed, same distribution, generate's multinomial draw per step: the same tokens; and the
    # re-forward log-probs that GRPO scores match the distribution the tokens were drawn from.
    model, processor = eos_prone_like
    inputs = _prompt(processor, "rating", [solid("red", 64)])
    torch.manual_seed(3)
    theirs = sample_completions(model, processor, inputs, 4, 16, temperature, share_prefix=False)
    torch.manual_seed(3)
    ours, logits_NTV = sample_completions(model, processor, inputs, 4, 16, temperature, return_scores=True,
                                          share_prefix=True, draw=draw_tokens_as_generate)  # fmt: skip
    assert torch.equal(theirs.ids_NT, ours.ids_NT)
    real = ours.mask_NT.bool()
    sampled = sampled_logprobs(logits_NTV, ours.ids_NT, processor, temperature)  # (N, T)
    scored = completion_logprobs(model, repeat_inputs(inputs, 4), ours.ids_NT, ours.mask_NT, temperature)
    torch.testing.assert_close(scored[real], sampled[real], atol=1e-5, rtol=0)


def test_bfloat16_load_of_the_real_configuration(like_dir):
    model, _ = load_policy(str(like_dir), dtype="bfloat16")
    assert {p.dtype for p in model.parameters()} == {torch.bfloat16}


@pytest.mark.slow
@pytest.mark.parametrize("lora_rank", [0, 8], ids=["full-fine-tuning", "lora"])
def test_shipped_experiment_runs_on_the_real_configuration(
    like_dir, synthetic_ir, tmp_path, lora_rank, capsys
):
    # experiments/imagereward.yaml as shipped (bf16 compute over float32 masters, activation
    # checkpointing, frozen vision tower, pixel cap), only smaller: 2 steps, G = 2, 8 new tokens.
    from common.config import load_config
    from grpo.train import train

    out = tmp_path / "run"
    cfg = load_config("experiments/imagereward.yaml", [
        f"model.name_or_path={like_dir}", f"model.lora_rank={lora_rank}", f"data.root={synthetic_ir}",
        f"train.output_dir={out}", "train.device=cpu", "train.steps=2", "train.save_every=0",
        "grpo.group_size=2", "grpo.prompts_per_step=2", "grpo.max_new_tokens=8", "grpo.minibatch_size=4",
        "eval.every=0", "data.subset=",
    ])  # fmt: skip
    ckpt = train(cfg)
    metrics = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [m["step"] for m in metrics] == [1, 2] and all(math.isfinite(m["loss"]) for m in metrics)
    for m in metrics:  # the health metrics under bf16 compute: every number finite, the entropy a real one
        assert all(math.isfinite(v) for v in m.values()), m
        assert m["entropy"] > 0.1, "the random model's sampled tokens are far from certain"
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    curves = EventAccumulator(str(out / "tensorboard")).Reload().Tags()["scalars"]
    assert {"train/entropy", "train/reward", "train/frac_reward_zero_std", "train/kl"} <= set(curves)

    if lora_rank == 0:  # the checkpoint is a Hugging Face folder that plain transformers opens
        from safetensors.torch import load_file
        from transformers import Qwen2_5_VLForConditionalGeneration

        hf = Qwen2_5_VLForConditionalGeneration.from_pretrained(ckpt)
        assert hf.config.text_config.vocab_size == 152_064
        stored = load_file(ckpt / "model.safetensors")
        assert {t.dtype for k, t in stored.items() if "visual" not in k} == {torch.float32}, "float32 masters"
        assert {t.dtype for k, t in stored.items() if "visual" in k} == {torch.bfloat16}, (
            "frozen, model.dtype"
        )
    pre = json.loads((ckpt / "preprocessor_config.json").read_text())
    assert pre["processor_class"] == "Qwen2_5_VLProcessor" and pre["max_pixels"] == DEFAULT_MAX_PIXELS
    assert (
        json.loads((ckpt / "processor_config.json").read_text())["processor_class"] == "Qwen2_5_VLProcessor"
    )

    from eval.rank import main as rank_main

    big = tmp_path / "big.png"
    Image.new("RGB", (1400, 1000), "red").save(big)
    small = tmp_path / "small.png"
    solid("blue", 64).save(small)
    rank_main(
        ["--model", str(ckpt), "--prompt", "a red square", "--max-new-tokens", "8", str(big), str(small)]
    )
    lines = capsys.readouterr().out.splitlines()
    assert lines[0].split()[:5] == ["rank", "score", "hard", "tokens", "file"]
    tokens = {Path(row.split()[4]).name: int(row.split()[3]) for row in lines[2:4]}
    # 1400×1000 under the checkpoint's 401,408-pixel cap → 532×728 pixels → 19 × 26 = 494 tokens
    # (15,301 would be the real processor's own cap); 64×64 → 56×56 → 2 × 2 = 4
    assert tokens == {"big.png": 494, "small.png": 4}


@pytest.mark.slow
def test_share_prefix_does_not_change_what_grpo_samples(like_dir, synthetic_ir, tmp_path, monkeypatch):
    # grpo.share_prefix=false samples with generate(), true with our own loop; under the real
    # generation_config.json both must write the same completions at the first step, once our
    # loop draws as generate does.
    import functools

    import grpo.train
    from common.config import load_config
    from grpo.train import train

    monkeypatch.setattr(grpo.train, "sample_completions",
                        functools.partial(grpo.train.sample_completions, draw=draw_tokens_as_generate))  # fmt: skip

    texts = {}
    for share in (True, False):
        out = tmp_path / f"share-{share}"
        train(load_config("experiments/imagereward.yaml", [
            f"model.name_or_path={like_dir}", f"data.root={synthetic_ir}", "data.subset=", f"train.output_dir={out}",
            "train.device=cpu", "train.steps=1", "train.save_every=0", "grpo.group_size=3", "grpo.prompts_per_step=2",
            "grpo.max_new_tokens=8", "grpo.kl_coef=0", "model.gradient_checkpointing=false", "eval.every=0",
            f"grpo.share_prefix={str(share).lower()}", "train.log_completions=6",
        ]))  # fmt: skip
        rows = [json.loads(line) for line in (out / "completions.jsonl").read_text().splitlines()]
        texts[share] = [(r["sample_id"], r["text"]) for r in rows]
    assert len(texts[True]) == 6 and texts[True] == texts[False]


def test_the_vision_tokens_left_out_of_the_log_probs_are_the_suppressed_ones(like):
    from models.qwen_vl import vision_token_ids

    model, processor = like
    assert vision_token_ids(model) == vision_tokens_by_name(processor) == list(range(151652, 151657))
