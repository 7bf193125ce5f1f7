"""The tiny model's cold start: a random taste drawn from its own seed, and well-formed targets
that fit the tiny experiments' token budget. That the demo's cold start yields a model whose
answers depend on the image is checked by ``tests/test_demo.py``."""

from __future__ import annotations

import json
import math
import random
from pathlib import Path

import numpy as np
import pytest
import yaml
from PIL import Image

from data.prompts import parse_completion
from data.synthetic import COLOURS, SHAPES, _draw
from data.types import TrainSample
from grpo.coldstart import THOUGHT, Taste, cold_start, format_targets, hue_sector, noise_floor

ROOT = Path(__file__).resolve().parent.parent
SCALE = tuple(range(1, 8))


def drawn(colour: str, seed: int) -> Image.Image:
    """One synthetic image of ``colour`` with the writer's jitter in shade, size and position."""
    rng = np.random.default_rng(seed)
    return _draw({"colour": colour, "shape": SHAPES[seed % 3], "defect": "none"}, 64, rng)


def test_each_synthetic_colour_falls_in_its_own_hue_sector_despite_the_jitter():
    sectors = {c: {hue_sector(drawn(c, s)) for s in range(40)} for c in COLOURS}
    assert all(len(found) == 1 for found in sectors.values()), sectors
    assert len({found.pop() for found in sectors.values()}) == len(COLOURS)


def test_taste_is_drawn_from_its_seed_alone_and_rates_distinct_hues_differently():
    assert Taste.draw(SCALE, 3) == Taste.draw(SCALE, 3)
    assert len({Taste.draw(SCALE, s).ratings for s in range(10)}) == 10
    taste = Taste.draw(SCALE, 0)
    assert sorted(taste.ratings[: len(SCALE)]) == list(SCALE)  # a shuffled scale: no ties between sectors 0–6
    assert {taste.rate(drawn(c, 1)) for c in COLOURS} <= set(SCALE)


def test_pair_answer_names_the_image_the_taste_prefers_and_tosses_a_coin_on_ties():
    taste = Taste.draw(SCALE, 0)
    ranked = sorted(COLOURS, key=lambda c: taste.rate(drawn(c, 0)))
    worse, better = drawn(ranked[0], 0), drawn(ranked[-1], 0)
    rng = random.Random(0)
    assert taste.answer("pair", [worse, better], rng) == 1
    assert taste.answer("pair", [better, worse], rng) == 0
    tie = [drawn(ranked[0], 1), drawn(ranked[0], 2)]
    assert {taste.answer("pair", tie, random.Random(s)) for s in range(20)} == {0, 1}


def test_targets_are_well_formed_and_fit_the_tiny_experiments_token_budget(tiny):
    _, processor = tiny
    rating = TrainSample("s", "a red circle on a white background", (), 5, "rating")
    pair = TrainSample("p", "a red circle on a white background", (), 1, "pair")
    rng = random.Random(0)
    for answers in ("taste", "uniform"):
        texts = format_targets([rating] * 30, [[drawn("red", s)] for s in range(30)], SCALE, answers,
                               Taste.draw(SCALE, 0), rng)  # fmt: skip
        texts += format_targets([pair] * 10, [[drawn("red", 0), drawn("blue", 0)]] * 10, None, answers,
                                Taste.draw(SCALE, 0), rng)  # fmt: skip
        assert all(parse_completion(t, SCALE).well_formed for t in texts[:30])
        assert all(parse_completion(t, (0, 1)).well_formed for t in texts[30:])
    budget = min(
        yaml.safe_load((ROOT / "experiments" / name).read_text())["grpo"]["max_new_tokens"]
        for name in ("tiny.yaml", "tiny_hpsv2.yaml")
    )
    target = f"<think>{THOUGHT}</think><answer>7</answer>"
    n = len(processor.tokenizer.encode(target, add_special_tokens=False)) + 1  # + the end of turn
    assert n <= budget, f"{n} target tokens do not fit in max_new_tokens={budget}"


def test_unknown_answer_mode_is_refused_before_any_work(tmp_path):
    with pytest.raises(ValueError, match="answers must be one of"):
        cold_start("no-such-model", None, str(tmp_path / "out"), answers="random")


def test_cold_start_records_the_answer_loss_against_the_answers_entropy(tiny_dir, synthetic_ir, tmp_path):
    """Mutation checked by hand: the recorded loss read one token early (``answer_at - 1``) fails it."""
    from data.imagereward import read_train

    train_set = read_train(synthetic_ir)
    out = cold_start(str(tiny_dir), train_set, str(tmp_path / "cold"), steps=12, batch_size=4,
                     progress=False, answers="uniform")  # fmt: skip
    record = json.loads((out / "cold_start.json").read_text())
    assert record["answers"] == "uniform" and len(record["answer_nll"]) == 12
    # 48 uniform draws over the scale: close to log(len(scale)), which no empirical entropy exceeds
    assert (
        0.8 * math.log(len(train_set.rating_values))
        < record["answer_entropy"]
        <= math.log(len(train_set.rating_values))
    )
    # The recorded loss is the answer token's, and the saved model is the trained one: the mean
    # NLL of the scale's digits at the answer position (uniform answers: −(1/K) Σ_d log p(d)),
    # recomputed here, is the first recorded value for the starting model and the last for the
    # saved one, and 12 steps lowered it clearly (measured 7.0 → 5.6; log K = 1.95).
    start, saved = (answer_nll(d, train_set) for d in (tiny_dir, out))
    assert start == pytest.approx(record["answer_nll"][0], abs=0.3)
    assert saved == pytest.approx(record["answer_nll"][-1], abs=0.3)
    assert saved < start - 0.8, "the cold start did not learn the answer token"


def answer_nll(model_dir, train_set) -> float:
    """Mean over 4 samples and every rating d of −log p(d) after ``<think>THOUGHT</think><answer>``."""
    import torch

    from grpo.rollout import encode_samples
    from models.logprobs import completion_logprobs
    from models.qwen_vl import load_policy

    model, processor = load_policy(str(model_dir))
    tok, scale = processor.tokenizer, train_set.rating_values
    samples = train_set.samples[:4]
    inputs = encode_samples(processor, samples, [[r.load() for r in s.images] for s in samples], scale)
    prefix = tok.encode(f"<think>{THOUGHT}</think><answer>", add_special_tokens=False)
    ids = torch.tensor(
        [prefix + tok.encode(str(d), add_special_tokens=False) for _ in samples for d in scale]
    )
    rows = torch.arange(len(samples)).repeat_interleave(len(scale))  # completion n continues prompt n // K
    with torch.no_grad():
        logp = completion_logprobs(model, inputs, ids, torch.ones_like(ids), prompt_rows=rows)
    return float(-logp[:, len(prefix)].mean())


def test_noisy_targets_replace_the_tastes_answer_at_the_given_rate_with_another_valid_one():
    taste, rng = Taste.draw(SCALE, 0), random.Random(0)
    rating = TrainSample("s", "a red circle on a white background", (), 5, "rating")
    pair = TrainSample("p", "a red circle on a white background", (), 1, "pair")
    red, blue = drawn("red", 0), drawn("blue", 0)
    for sample, images, valid in ((rating, [red], SCALE), (pair, [red, blue], (0, 1))):
        clean = parse_completion(
            format_targets([sample], [images], SCALE, "taste", taste, rng)[0], valid
        ).answer
        texts = format_targets([sample] * 2000, [images] * 2000, SCALE, "taste", taste, rng, noise=0.2)
        answers = [parse_completion(t, valid).answer for t in texts]
        assert all(a in valid for a in answers)
        replaced = sum(a != clean for a in answers) / len(answers)
        assert 0.17 < replaced < 0.23, replaced  # 2000 draws at 0.2: standard error 0.009
        if len(valid) > 2:  # the replacement is spread over the other answers, not one of them
            assert len({a for a in answers if a != clean}) == len(valid) - 1


def test_noise_floor_is_the_entropy_of_the_noisy_answers():
    assert noise_floor(0.0, 2) == 0.0
    assert noise_floor(0.2, 2) == pytest.approx(-(0.8 * math.log(0.8) + 0.2 * math.log(0.2)))  # 0.5004
    assert noise_floor(0.3, 7) == pytest.approx(-(0.7 * math.log(0.7) + 0.3 * math.log(0.05)))  # 1.1484


def test_cold_start_stops_when_the_answer_loss_reaches_the_bar_then_calibrates(
    tiny_dir, synthetic_ir, tmp_path
):
    """A bar every loss meets stops the learning phase after one window; a bar none meets runs the
    whole budget and records that it was not reached. The calibration steps come after either."""
    from data.imagereward import read_train

    train_set = read_train(synthetic_ir)
    kw = {"batch_size": 2, "progress": False, "window": 3, "calibrate_steps": 2, "noise": 0.3}
    out = cold_start(str(tiny_dir), train_set, str(tmp_path / "a"), steps=8, until_nll=1e9, **kw)
    record = json.loads((out / "cold_start.json").read_text())
    assert (record["learn_steps"], record["reached_until_nll"], record["steps"]) == (3, 3, 5)
    assert len(record["answer_nll"]) == 5 and record["noise_floor"] == pytest.approx(
        noise_floor(0.3, 7), abs=1e-4
    )
    out = cold_start(str(tiny_dir), train_set, str(tmp_path / "b"), steps=4, until_nll=0.0, **kw)
    record = json.loads((out / "cold_start.json").read_text())
    assert (record["learn_steps"], record["reached_until_nll"], record["steps"]) == (4, None, 6)
    with pytest.raises(ValueError, match="noise must be"):
        cold_start(str(tiny_dir), train_set, str(tmp_path / "c"), noise=1.0)
