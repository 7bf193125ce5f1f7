"""The rank command and the reward-function API (eval/rank.py)."""

from __future__ import annotations

import json

import pytest
import torch
from conftest import solid

from data.images import BadImageError
from eval.rank import PreferenceScorer, expand_images, main

PROMPT = "a red circle on a white background"


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture
def folder(tmp_path):
    d = tmp_path / "imgs"
    d.mkdir()
    for colour in ("red", "green", "blue"):
        solid(colour).save(d / f"{colour}.png")
    (d / "notes.txt").write_text("not an image")  # ignored: not an image suffix
    return d


def _table_rows(out: str) -> list[list[str]]:
    lines = out.splitlines()
    start = next(i for i, line in enumerate(lines) if line.lstrip().startswith("rank")) + 2  # header, rule
    rows = lines[start:]
    return [line.split() for line in rows if line.strip() and not line.startswith(("wrote", "image tokens"))]


@pytest.mark.parametrize("method", ["rating", "anchor"])
def test_rank_cli_on_a_folder_prints_three_rows(tiny_dir, folder, tmp_path, capsys, method):
    out_json = tmp_path / "ranked.json"
    main(["--model", str(tiny_dir), "--prompt", PROMPT, str(folder), "--method", method, "--k", "2",
          "--max-new-tokens", "8", "--json", str(out_json)])  # fmt: skip
    rows = _table_rows(capsys.readouterr().out)
    assert len(rows) == 3
    assert [int(r[0]) for r in rows] == [1, 2, 3]
    scores = [float(r[1]) for r in rows]
    assert scores == sorted(scores, reverse=True)  # best first
    assert {r[4].rsplit("/", 1)[-1] for r in rows} == {"red.png", "green.png", "blue.png"}
    assert [int(r[3]) for r in rows] == [4, 4, 4], "64×64 images cost 4 image tokens each"
    saved = json.loads(out_json.read_text())
    assert [r["soft"] for r in saved["ranking"]] == pytest.approx(scores, abs=1e-4)
    assert len(saved["requests"]) == (3 if method == "rating" else 2)
    assert all(len(q["texts"]) == 2 for q in saved["requests"])
    if method == "anchor":
        assert 0.5 in scores and saved["anchor"].endswith(".png")


def test_rank_cli_skips_an_undecodable_file(tiny_dir, folder, capsys):
    (folder / "broken.png").write_bytes(b"\x89PNG truncated")
    main(["--model", str(tiny_dir), "--prompt", PROMPT, str(folder), "--max-new-tokens", "8"])
    captured = capsys.readouterr()
    assert len(_table_rows(captured.out)) == 3 and "broken.png" in captured.err


def test_expand_images(folder):
    assert [p.name for p in expand_images([str(folder)])] == ["blue.png", "green.png", "red.png"]
    with pytest.raises(ValueError, match="no image files"):
        expand_images([str(folder / "..")])


def test_preference_scorer_is_a_deterministic_reward_function(tiny, folder):
    scorer = PreferenceScorer(tiny, method="rating", k=2, max_new_tokens=8, seed=0)
    images = [solid("red"), solid("blue", 90), folder / "green.png"]  # PIL images and paths alike
    rewards = scorer.score(PROMPT, images)
    assert len(rewards) == 3 and all(1.0 <= r <= 7.0 for r in rewards)
    assert scorer.score(PROMPT, images) == rewards  # same call, same seed → same rewards
    ranked = scorer.rank(PROMPT, images)
    assert [r.index for r in ranked] == sorted(range(3), key=lambda i: -rewards[i])
    pairwise = PreferenceScorer(tiny, method="anchor", k=1, max_new_tokens=8).score(PROMPT, images)
    assert pairwise.count(0.5) >= 1 and all(0.0 <= p <= 1.0 for p in pairwise)
    with pytest.raises(BadImageError, match="missing.png"):
        scorer.score(PROMPT, [folder / "missing.png"])


def test_load_model_merges_a_lora_checkpoint(tiny_dir, tmp_path):
    """A LoRA run's checkpoint holds only the adapter: load_model merges it onto the base it names."""
    from peft import LoraConfig, get_peft_model

    from common.config import LANGUAGE_LORA_TARGET
    from data.prompts import messages_for
    from eval.rank import load_model
    from models.qwen_vl import build_inputs, load_policy, render_prompt

    base, processor = load_policy(str(tiny_dir))
    peft_model = get_peft_model(base, LoraConfig(r=4, lora_alpha=8, target_modules=LANGUAGE_LORA_TARGET))
    torch.manual_seed(0)
    for name, p in peft_model.named_parameters():
        if "lora_B" in name:
            p.data.normal_(0, 0.5)  # a non-zero update, so the merge matters
    ckpt = tmp_path / "checkpoint-000001"
    peft_model.save_pretrained(ckpt)
    processor.save_pretrained(ckpt)
    merged, merged_processor = load_model(str(ckpt), "float32", "cpu")
    text = render_prompt(processor, messages_for("rating", PROMPT, 1, (1, 2, 3)))
    inputs = build_inputs(merged_processor, [text], [[solid("red")]])
    with torch.no_grad():
        torch.testing.assert_close(
            merged(**inputs).logits, peft_model.eval()(**inputs).logits, atol=1e-4, rtol=1e-4
        )
        assert not torch.allclose(merged(**inputs).logits, load_policy(str(tiny_dir))[0](**inputs).logits)
