"""Build a tiny Qwen2.5-VL offline, deterministically: ``python -m models.tiny OUT_DIR [--seed N] [--like DIR]``.

Our machines cannot download ``Qwen/Qwen2.5-VL-7B-Instruct``, so tests, the demo and the
benchmarks run the *same code* on a randomly initialised Qwen2.5-VL of about 1.0M parameters
whose folder looks exactly like a real checkpoint:

- ``config.json`` + ``model.safetensors`` (``Qwen2_5_VLForConditionalGeneration``),
- a byte-level BPE tokenizer trained here on the prompt templates and the answer tags, with
  Qwen's pre-tokenizer (so digits are always single tokens) and the real Qwen2.5-VL special
  tokens in Qwen's order, right after the BPE vocabulary,
- the Qwen2.5-VL-Instruct chat template,
- a torchvision-free image processor (``Qwen2VLImageProcessorPil``) and a processor config
  saved under the standard ``Qwen2_5_VLProcessor`` class name, so that plain
  ``AutoProcessor.from_pretrained`` also loads the folder where torchvision is installed.

Presets (what each can learn: docs/facts.md): ``tiny`` (text hidden 128 × 2 layers, vision 64 × 2
blocks, ~1.0M parameters), ``tiny-pairs`` (tiny's language model, small's vision tower, ~2.3M; the
demo's pairwise run, see ``PRESETS``) and ``small`` (text 256 × 4, vision 128 × 4, ~6M) for
benchmarks and the prompt-conditioned task. The same seed gives byte-identical weights and tokenizer files.

``--like DIR`` builds instead a model of a real checkpoint's configuration shrunk only in size
(``shrink_config``): the real vocabulary, token ids, rope and vision geometry, with random weights
and ``DIR``'s own tokenizer, chat-template, generation and processor files beside it. With
``../shared/fixtures/qwen2.5-vl-7b-instruct`` this is how tests run the real Qwen2.5-VL-7B-Instruct
files offline (about 40M parameters, almost all of them the 152,064-row embedding and LM head).
"""

from __future__ import annotations

import argparse
import copy
import json
import random
import shutil
from pathlib import Path

import torch
from tokenizers import Regex, Tokenizer, decoders, models, normalizers, pre_tokenizers, trainers
from transformers import (
    Qwen2_5_VLConfig,
    Qwen2_5_VLForConditionalGeneration,
    Qwen2Tokenizer,
    Qwen2VLImageProcessorPil,
)

from data.prompts import PAIR_TEMPLATE, RATING_TEMPLATE

# The added tokens of Qwen2.5-VL, in the order (and so with the relative ids) of the real tokenizer.
QWEN_SPECIAL_TOKENS = (
    "<|endoftext|>", "<|im_start|>", "<|im_end|>", "<|object_ref_start|>", "<|object_ref_end|>",
    "<|box_start|>", "<|box_end|>", "<|quad_start|>", "<|quad_end|>", "<|vision_start|>",
    "<|vision_end|>", "<|vision_pad|>", "<|image_pad|>", "<|video_pad|>", "<tool_call>",
    "</tool_call>", "<|fim_prefix|>", "<|fim_middle|>", "<|fim_suffix|>", "<|fim_pad|>",
    "<|repo_name|>", "<|file_sep|>",
)  # fmt: skip
# Tokens that are special in the tokenizer sense (skipped when decoding); the last six are not.
_NOT_SPECIAL = {"<tool_call>", "</tool_call>", "<|fim_prefix|>", "<|fim_middle|>", "<|fim_suffix|>", "<|fim_pad|>",
                "<|repo_name|>", "<|file_sep|>"}  # fmt: skip

# Qwen2's pre-tokenizer: digits are split one by one, so every digit is its own token.
QWEN_PRETOKENIZE_REGEX = r"""(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"""

# The chat template of Qwen2.5-VL-*-Instruct: one <|vision_start|><|image_pad|><|vision_end|> per image.
QWEN_CHAT_TEMPLATE = (
    "{% set image_count = namespace(value=0) %}{% set video_count = namespace(value=0) %}"
    "{% for message in messages %}{% if loop.first and message['role'] != 'system' %}"
    "<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n{% endif %}"
    "<|im_start|>{{ message['role'] }}\n{% if message['content'] is string %}{{ message['content'] }}<|im_end|>\n"
    "{% else %}{% for content in message['content'] %}"
    "{% if content['type'] == 'image' or 'image' in content or 'image_url' in content %}"
    "{% set image_count.value = image_count.value + 1 %}{% if add_vision_id %}Picture {{ image_count.value }}: "
    "{% endif %}<|vision_start|><|image_pad|><|vision_end|>"
    "{% elif content['type'] == 'video' or 'video' in content %}{% set video_count.value = video_count.value + 1 %}"
    "{% if add_vision_id %}Video {{ video_count.value }}: {% endif %}<|vision_start|><|video_pad|><|vision_end|>"
    "{% elif 'text' in content %}{{ content['text'] }}{% endif %}{% endfor %}<|im_end|>\n{% endif %}{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)

PRESETS = {
    "tiny": dict(text_hidden=128, text_layers=2, text_heads=4, text_kv_heads=2, text_ffn=512,
                 vision_hidden=64, vision_layers=2, vision_heads=2, vision_ffn=256, mrope_section=[4, 6, 6]),
    # tiny's language model with small's vision tower. Supervised on pairs alone (300 steps, the
    # true labels), tiny's answer stays the same for every pair (pair accuracy 0.49), and so it does
    # with 4 text layers (0.49) or a vision tower of 128 × 2 (0.49); with 128 × 4 it compares the
    # two images (0.99, 25% more time per step; text 256 wide also does, 0.98, at 80% more).
    "tiny-pairs": dict(text_hidden=128, text_layers=2, text_heads=4, text_kv_heads=2, text_ffn=512,
                       vision_hidden=128, vision_layers=4, vision_heads=4, vision_ffn=512, mrope_section=[4, 6, 6]),
    "small": dict(text_hidden=256, text_layers=4, text_heads=4, text_kv_heads=2, text_ffn=1024,
                  vision_hidden=128, vision_layers=4, vision_heads=4, vision_ffn=512, mrope_section=[8, 12, 12]),
}  # fmt: skip

BPE_VOCAB_SIZE = 1024  # byte alphabet (256) + learned merges
# Image size bounds of the tiny processor: 64×64 → 56×56 → 4 merged image tokens; ~200 px → ~49 tokens.
TINY_MIN_PIXELS = 56 * 56
TINY_MAX_PIXELS = 256 * 28 * 28

# Words the synthetic prompts and reasoning use, so that they tokenize into few pieces.
_WORDS = (
    "red yellow green blue orange purple pink white black gray brown colour color shape circle square triangle "
    "star ellipse rectangle diamond cross a an the of on in with and is are this that image images picture photo "
    "first second better worse best worst good bad quality prompt matches match does not sharp blurry noisy clean "
    "background object drawn shows looks people prefer would like because so rating rate think answer score "
    "bright dark small large big centered left right top bottom detailed simple realistic painting cat dog house "
    "tree car flower mountain city portrait landscape sky water"
).split()


def _tokenizer_corpus(seed: int) -> list[str]:
    """Text the BPE is trained on: templates, tags, example answers and prompt words."""
    rng = random.Random(seed)
    lines = []
    for _ in range(2000):
        words = " ".join(rng.choice(_WORDS) for _ in range(rng.randint(3, 9)))
        low, high = rng.choice([(1, 7), (0, 9), (1, 5), (1, 10)])
        lines.append(RATING_TEMPLATE.format(prompt=words, low=low, high=high))
        lines.append(PAIR_TEMPLATE.format(prompt=words))
        think = " ".join(rng.choice(_WORDS) for _ in range(rng.randint(4, 16)))
        lines.append(f"<think>{think}</think><answer>{rng.randint(0, 9)}</answer>")
        lines.append(f"<think> {think} </think>\n<answer> {rng.randint(0, 9)} </answer>")
    return lines


def build_tokenizer(seed: int = 0) -> Qwen2Tokenizer:
    """Train a byte-level BPE offline and wrap it as Qwen's ``Qwen2Tokenizer``."""
    bpe = Tokenizer(models.BPE())
    bpe.normalizer = normalizers.NFC()
    bpe.pre_tokenizer = pre_tokenizers.Sequence(
        [
            pre_tokenizers.Split(Regex(QWEN_PRETOKENIZE_REGEX), behavior="isolated"),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
        ]
    )
    bpe.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=BPE_VOCAB_SIZE,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
        special_tokens=[],
    )
    bpe.train_from_iterator(_tokenizer_corpus(seed), trainer=trainer)
    vocab = bpe.get_vocab()
    base = len(vocab)
    vocab.update({t: base + i for i, t in enumerate(QWEN_SPECIAL_TOKENS)})  # Qwen's order, after the BPE
    merges = [tuple(pair) for pair in json.loads(bpe.to_str())["model"]["merges"]]
    tok = Qwen2Tokenizer(
        vocab=vocab,
        merges=merges,
        unk_token=None,
        eos_token="<|im_end|>",
        pad_token="<|endoftext|>",
        model_max_length=32768,
    )
    from tokenizers import AddedToken

    tok.add_tokens(
        [AddedToken(t, special=t not in _NOT_SPECIAL, normalized=False) for t in QWEN_SPECIAL_TOKENS]
    )
    tok.chat_template = QWEN_CHAT_TEMPLATE
    ids = tok.convert_tokens_to_ids(list(QWEN_SPECIAL_TOKENS))
    assert ids == list(range(ids[0], ids[0] + len(ids))), f"special tokens must be contiguous, got {ids}"
    return tok


def build_config(tok: Qwen2Tokenizer, preset: str = "tiny") -> Qwen2_5_VLConfig:
    """A Qwen2.5-VL config of the given preset whose token ids match ``tok``."""
    p = PRESETS[preset]
    ids = dict(zip(QWEN_SPECIAL_TOKENS, tok.convert_tokens_to_ids(list(QWEN_SPECIAL_TOKENS)), strict=True))
    vocab_size = (
        -(-len(tok) // 64) * 64
    )  # round up to a multiple of 64, as real checkpoints pad the vocabulary
    head_dim = p["text_hidden"] // p["text_heads"]
    assert sum(p["mrope_section"]) * 2 == head_dim, "mrope_section must sum to head_dim / 2"
    text = dict(
        vocab_size=vocab_size,
        hidden_size=p["text_hidden"],
        intermediate_size=p["text_ffn"],
        num_hidden_layers=p["text_layers"],
        num_attention_heads=p["text_heads"],
        num_key_value_heads=p["text_kv_heads"],
        max_position_embeddings=4096,
        rope_parameters={
            "rope_type": "default",
            "rope_theta": 1000000.0,
            "mrope_section": p["mrope_section"],
        },
        bos_token_id=ids["<|endoftext|>"],
        eos_token_id=ids["<|im_end|>"],
        pad_token_id=ids["<|endoftext|>"],
    )
    vision = dict(
        depth=p["vision_layers"],
        hidden_size=p["vision_hidden"],
        intermediate_size=p["vision_ffn"],
        num_heads=p["vision_heads"],
        out_hidden_size=p["text_hidden"],
        patch_size=14,
        spatial_merge_size=2,
        temporal_patch_size=2,
        window_size=112,
        fullatt_block_indexes=[p["vision_layers"] - 1],
    )
    return Qwen2_5_VLConfig(
        text_config=text,
        vision_config=vision,
        image_token_id=ids["<|image_pad|>"],
        video_token_id=ids["<|video_pad|>"],
        vision_start_token_id=ids["<|vision_start|>"],
        vision_end_token_id=ids["<|vision_end|>"],
        tie_word_embeddings=False,  # as in Qwen2.5-VL-7B
    )


def build_tiny(out_dir: str | Path, seed: int = 0, preset: str = "tiny") -> Path:
    """Write a loadable tiny Qwen2.5-VL folder to ``out_dir`` and return its path."""
    from models.qwen_vl import ImageOnlyQwenVLProcessor, save_processor

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    tok = build_tokenizer(seed)
    config = build_config(tok, preset)
    torch.manual_seed(seed)
    model = Qwen2_5_VLForConditionalGeneration(config).eval()
    model.generation_config.eos_token_id = [config.text_config.eos_token_id, config.text_config.pad_token_id]
    model.generation_config.pad_token_id = config.text_config.pad_token_id
    model.generation_config.bos_token_id = config.text_config.bos_token_id
    model.save_pretrained(out)
    n_params = sum(t.numel() for t in model.parameters())
    image_processor = Qwen2VLImageProcessorPil(min_pixels=TINY_MIN_PIXELS, max_pixels=TINY_MAX_PIXELS)
    processor = ImageOnlyQwenVLProcessor(
        image_processor=image_processor, tokenizer=tok, chat_template=QWEN_CHAT_TEMPLATE
    )
    save_processor(processor, out)
    print(f"wrote a {preset} Qwen2.5-VL ({n_params / 1e6:.2f}M parameters, vocabulary {len(tok)}) to {out}")
    return out


# ---------------------------------------------------------------------------------------------
# A real checkpoint's configuration, shrunk only in size (``--like DIR``)

# The files of a checkpoint folder that are not weights: tokenizer, chat template, generation
# defaults and image processor. ``--like`` copies them unchanged, so the code paths that read them
# (tokenization, the chat template, generate()'s inherited defaults, image-token counts) run on
# the real files.
CHECKPOINT_TEXT_FILES = (
    "tokenizer.json", "tokenizer_config.json", "vocab.json", "merges.txt", "special_tokens_map.json",
    "added_tokens.json", "chat_template.json", "chat_template.jinja", "generation_config.json",
    "preprocessor_config.json", "processor_config.json",
)  # fmt: skip


def shrink_config(config: Qwen2_5_VLConfig, preset: str = "tiny") -> Qwen2_5_VLConfig:
    """``config`` with only its sizes replaced by ``preset``'s: depth, widths, heads.

    Everything else stays as the checkpoint has it: the vocabulary (152,064 for Qwen2.5-VL), every
    token id, patch / merge / window sizes, rope θ, untied embeddings. ``mrope_section`` is scaled
    to the smaller head (it must sum to head_dim / 2), and the vision tower keeps one windowed
    and one full-attention block, as the real tower alternates them.
    """
    p = PRESETS[preset]
    config = copy.deepcopy(config)
    text, vision = config.text_config, config.vision_config
    old_half = sum(text.rope_parameters["mrope_section"])
    new_half = p["text_hidden"] // p["text_heads"] // 2
    section = [s * new_half // old_half for s in text.rope_parameters["mrope_section"]]
    section[0] += new_half - sum(section)  # rounding: the sum must be exact
    text.rope_parameters = {**text.rope_parameters, "mrope_section": section}
    text.hidden_size, text.intermediate_size = p["text_hidden"], p["text_ffn"]
    text.num_hidden_layers, text.max_window_layers = p["text_layers"], p["text_layers"]
    text.num_attention_heads, text.num_key_value_heads = p["text_heads"], p["text_kv_heads"]
    text.layer_types = text.layer_types[: p["text_layers"]]
    vision.depth, vision.hidden_size = p["vision_layers"], p["vision_hidden"]
    vision.intermediate_size, vision.num_heads = p["vision_ffn"], p["vision_heads"]
    vision.out_hidden_size = p["text_hidden"]
    vision.fullatt_block_indexes = [p["vision_layers"] - 1]
    return config


def build_like(out_dir: str | Path, like_dir: str | Path, seed: int = 0, preset: str = "tiny") -> Path:
    """A model of ``like_dir``'s configuration shrunk in size, with its non-weight files copied.

    Random weights, ``like_dir``'s tokenizer, chat template, generation and processor files
    unchanged. Built offline from a local folder (no download).
    """
    like, out = Path(like_dir), Path(out_dir)
    if not (like / "config.json").is_file():
        raise FileNotFoundError(
            f"--like {like}: no config.json there; expected a Qwen2.5-VL checkpoint folder"
        )
    config = shrink_config(Qwen2_5_VLConfig.from_pretrained(like), preset)
    torch.manual_seed(seed)
    model = Qwen2_5_VLForConditionalGeneration(config).eval()
    out.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out)
    copied = []
    for name in CHECKPOINT_TEXT_FILES:  # after save_pretrained, which writes its own generation_config.json
        if (like / name).is_file():
            shutil.copyfile(like / name, out / name)
            copied.append(name)
    n_params = sum(t.numel() for t in model.parameters())
    print(f"wrote a {preset}-sized model of {like}'s configuration ({n_params / 1e6:.1f}M parameters, "
          f"vocabulary {config.text_config.vocab_size}) to {out}; copied {', '.join(copied)}")  # fmt: skip
    return out


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=argparse.RawTextHelpFormatter
    )
    parser.add_argument("out_dir", help="folder to write the model into (created if missing)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the weights and the tokenizer corpus")
    parser.add_argument(
        "--preset", choices=sorted(PRESETS), default="tiny", help="model size (default: tiny)"
    )
    parser.add_argument(
        "--like",
        metavar="DIR",
        help="copy DIR's configuration (shrunk to --preset's sizes) and its tokenizer, chat template,\n"
        "generation and processor files, e.g. a local Qwen2.5-VL-7B-Instruct folder",
    )
    args = parser.parse_args(argv)
    if args.like:
        build_like(args.out_dir, args.like, seed=args.seed, preset=args.preset)
    else:
        build_tiny(args.out_dir, seed=args.seed, preset=args.preset)


if __name__ == "__main__":
    main()
