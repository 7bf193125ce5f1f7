"""The GRPO loop end to end on the tiny model: runs, learns something, resumes exactly."""

from __future__ import annotations

import itertools
import json
import math
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from common.config import load_config
from grpo.rollout import encode_samples
from grpo.run.stream import SampleStream, continue_order, global_index
from grpo.train import lr_at, train
from models.qwen_vl import load_policy

REQUIRED_METRICS = {
    "step", "lr", "reward_mean", "reward_std", "frac_zero_std", "reward/format", "reward/exact", "reward/approx",
    "adv_std", "kl", "clip_frac", "ratio_mean", "ratio_min", "ratio_max", "loss", "grad_norm",
    "completion_len_mean", "completion_len_max", "frac_truncated", "time/generate", "time/score",
    "time/reference", "time/update", "tokens_per_s",
}  # fmt: skip


def tiny_config(model_dir, data_root, out, *overrides):
    base = [
        f"model.name_or_path={model_dir}", "model.dtype=float32", f"data.root={data_root}",
        f"train.output_dir={out}", "train.device=cpu", "train.steps=3", "train.lr=1e-3", "train.warmup_steps=1",
        "train.save_every=0", "grpo.group_size=4", "grpo.prompts_per_step=3", "grpo.max_new_tokens=20",
        "grpo.minibatch_size=6", "grpo.kl_coef=0.04", "eval.every=0",
    ]  # fmt: skip
    return load_config("experiments/tiny.yaml", base + list(overrides))


def weights(folder: Path, name="model.safetensors") -> dict[str, torch.Tensor]:
    return load_file(folder / name)


def test_lr_schedule_by_hand():
    # warm-up 4 steps to 1.0: 0.25, 0.5, 0.75, 1.0; then cosine from 1.0 down to 0.1 at the last step
    assert [lr_at(s, 1.0, 4, 10, "constant") for s in range(5)] == [0.25, 0.5, 0.75, 1.0, 1.0]
    assert lr_at(4, 1.0, 4, 10, "cosine") == pytest.approx(1.0)
    assert lr_at(10, 1.0, 4, 10, "cosine") == pytest.approx(0.1)
    assert lr_at(7, 1.0, 4, 10, "linear") == pytest.approx(0.5)


def test_sample_stream_is_seeded_and_splits_ranks():
    a = SampleStream(10, seed=3)
    first = [a.next_index() for _ in range(10)]
    assert sorted(first) == list(range(10)), "one epoch visits every sample once"
    assert [SampleStream(10, seed=3).next_index() for _ in range(1)] == first[:1]
    resumed = SampleStream(10, seed=3, position=4)
    assert [resumed.next_index() for _ in range(6)] == first[4:]
    r0, r1 = SampleStream(10, 3, rank=0, world=2), SampleStream(10, 3, rank=1, world=2)
    both = [r0.next_index() for _ in range(5)] + [r1.next_index() for _ in range(5)]
    assert sorted(both) == list(range(10)), "ranks take disjoint halves of an epoch"


def test_the_global_order_continues_on_another_number_of_ranks():
    # By hand: 2 ranks; rank 0 skipped an undecodable image, so it took 3 samples and rank 1 took 2:
    # global indices 0, 2, 4 (rank 0) and 1, 3 (rank 1). The order continues at 4, passing over it.
    start, done = continue_order([3, 2], 0, ())
    assert (start, done) == (4, (4,))
    assert [global_index(j, start, done) for j in range(3)] == [5, 6, 7]
    three = [SampleStream(10, 3, rank=r, world=3, start=start, done=done) for r in range(3)]
    one = SampleStream(10, seed=3)
    order = [one.next_index() for _ in range(10)]
    assert [s.next_index() for s in three] == order[5:8], "3 ranks take 5, 6, 7"

    # Any number of ranks, run unequally far, then any other number, twice: every global index
    # up to where the last ranks stopped is taken exactly once.
    for w1, w2, w3 in itertools.product((1, 2, 3), (1, 2, 4), (1, 3)):
        taken, start, done = [], 0, ()
        for world, extra in ((w1, 0), (w2, 1), (w3, 2)):
            positions = [(r + extra) % 3 for r in range(world)]  # 0 to 2 samples each
            taken += [
                global_index(p * world + r, start, done) for r in range(world) for p in range(positions[r])
            ]
            start, done = continue_order(positions, start, done)
        assert len(taken) == len(set(taken)), "a sample repeated"
        assert set(range(start)) <= set(taken) and min(done, default=start) >= start, "a sample skipped"
        assert set(taken) - set(range(start)) == set(done)


def test_minibatch_slices_prompts_and_images(cold_tiny_dir, synthetic_ir, tiny):
    from data.imagereward import read_train
    from grpo.rollout import RolloutBuffer

    _, processor = tiny
    ts = read_train(synthetic_ir)
    samples = ts.samples[:3]
    images = [[r.load() for r in s.images] for s in samples]
    inputs = encode_samples(processor, samples, images, ts.rating_values)
    G, T = 2, 5
    buf = RolloutBuffer(inputs, G, torch.zeros(6, T, dtype=torch.long), torch.ones(6, T), [""] * 6,
                        torch.zeros(6, dtype=torch.bool), samples, share_prefix=False)  # fmt: skip
    mb = buf.minibatch(torch.tensor([3, 4]))  # completions of prompts 1 and 2
    direct = encode_samples(processor, samples[1:3], images[1:3], ts.rating_values)
    torch.testing.assert_close(mb.inputs["pixel_values"], direct["pixel_values"])
    assert mb.inputs["image_grid_thw"].tolist() == direct["image_grid_thw"].tolist()


def test_short_run_changes_weights_and_logs(cold_tiny_dir, synthetic_ir, tmp_path):
    cfg = tiny_config(cold_tiny_dir, synthetic_ir, tmp_path / "run")
    final = train(cfg)
    before, after = weights(Path(cold_tiny_dir)), weights(final)
    changed = [k for k in before if not torch.equal(before[k], after[k])]
    assert changed, "GRPO updated no weight"
    assert any("visual" in k for k in changed), "the vision tower trains when freeze_vision=false"
    rows = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [1, 2, 3]
    for r in rows:
        assert REQUIRED_METRICS <= set(r), REQUIRED_METRICS - set(r)
        assert all(isinstance(v, (int, float)) and v == v for v in r.values()), "no NaN"
        # μ = 1: the ratio is exactly 1 and nothing is clipped
        assert r["ratio_mean"] == r["ratio_min"] == r["ratio_max"] == 1.0 and r["clip_frac"] == 0.0
    assert any(r["reward_std"] > 0 for r in rows), "the cold-started model's rewards must vary"
    completions = (tmp_path / "run" / "completions.jsonl").read_text().splitlines()
    assert len(completions) == 3 * cfg.train.log_completions
    assert (tmp_path / "run" / "config.yaml").exists() and (final / "config.yaml").exists()


def test_lora_keeps_base_weights(cold_tiny_dir, synthetic_ir, tmp_path):
    """LoRA with β > 0: the reference is the base model (adapters off), so the KL term is 0 at the
    first step and positive once the adapters moved; ``save_merged`` writes W + (α/r)·B·A.

    Mutation checked by hand: the reference pass without ``disable_adapter()`` (KL ≡ 0) fails it."""
    # lr 1e-2: B starts at 0, and at lr 1e-3 the KL after one step is only ~4e-8
    cfg = tiny_config(cold_tiny_dir, synthetic_ir, tmp_path / "lora", "model.lora_rank=4", "model.lora_alpha=8",
                      "model.lora_dropout=0.0", "model.freeze_vision=true", "train.save_merged=true",
                      "train.lr=1e-2")  # fmt: skip
    final = train(cfg)
    adapter = weights(final, "adapter_model.safetensors")
    assert adapter and all("lora_" in k for k in adapter)
    assert not any("visual" in k for k in adapter), "freeze_vision keeps adapters off the vision tower"
    lora_b = [v for k, v in adapter.items() if "lora_B" in k]
    assert any(v.abs().sum() > 0 for v in lora_b), "lora_B starts at zero and must have moved"
    kl = [json.loads(line)["kl"] for line in (tmp_path / "lora" / "metrics.jsonl").read_text().splitlines()]
    # k3 of identical models is 0 to float rounding (~1e-14); the mutation above gives exactly 0
    assert abs(kl[0]) < 1e-10 and all(k > 1e-8 for k in kl[1:]), f"π_ref must stay the base model: kl {kl}"

    # The merged folder loads as a plain model; compare parameters by module name.
    base = load_policy(str(cold_tiny_dir))[0].state_dict()
    merged = load_policy(str(final / "merged"))[0].state_dict()
    assert set(base) == set(merged)
    scale = 8 / 4  # α / r
    targets = set()
    for key in adapter:  # base_model.model.<module>.lora_A.weight → <module>.weight
        if ".lora_A." in key:
            module = key.removeprefix("base_model.model.").split(".lora_A.")[0]
            a, b = adapter[key], adapter[key.replace(".lora_A.", ".lora_B.")]  # (r, in), (out, r)
            expected = base[f"{module}.weight"] + scale * b @ a  # (out, in)
            torch.testing.assert_close(merged[f"{module}.weight"], expected, atol=1e-6, rtol=0, msg=module)
            targets.add(f"{module}.weight")
    assert len(targets) == 2 * 7, "q k v o gate up down in each of the 2 decoder layers"
    assert all(torch.equal(base[k], merged[k]) for k in base if k not in targets), "untargeted weights change"


@pytest.mark.parametrize("mode", ["full", pytest.param("lora", marks=pytest.mark.slow)])
def test_resume_is_bitwise_identical(cold_tiny_dir, synthetic_ir, tmp_path, mode):
    """4 steps straight = 2 steps, then resumed for 2 more: the same weights (the adapter for
    LoRA, whose base is not saved) and the same metrics, bit for bit."""
    lora = ["model.lora_rank=4", "model.lora_alpha=8", "model.lora_dropout=0.0"] if mode == "lora" else []
    name = "adapter_model.safetensors" if mode == "lora" else "model.safetensors"
    straight = train(tiny_config(cold_tiny_dir, synthetic_ir, tmp_path / "a", "train.steps=4", *lora))
    train(tiny_config(cold_tiny_dir, synthetic_ir, tmp_path / "b", "train.steps=2", *lora))
    resumed = train(
        tiny_config(cold_tiny_dir, synthetic_ir, tmp_path / "b", "train.steps=4", "train.resume=auto", *lora)
    )
    a, b = weights(straight, name), weights(resumed, name)
    assert set(a) == set(b) and all(torch.equal(a[k], b[k]) for k in a)
    assert not all(
        torch.equal(a[k], v) for k, v in weights(tmp_path / "b" / "checkpoint-000002", name).items()
    )
    ma = (tmp_path / "a" / "metrics.jsonl").read_text().splitlines()
    mb = (tmp_path / "b" / "metrics.jsonl").read_text().splitlines()

    def strip(line):  # timings and peak memory differ between runs; everything else must not
        return {
            k: v
            for k, v in json.loads(line).items()
            if not k.startswith(("time/", "memory/")) and k != "tokens_per_s"
        }

    assert [strip(x) for x in ma] == [strip(x) for x in mb]


def test_beta_zero_skips_reference(cold_tiny_dir, synthetic_ir, tmp_path):
    from grpo.policy import build_policy

    cfg = tiny_config(cold_tiny_dir, synthetic_ir, tmp_path / "z", "grpo.kl_coef=0")
    _, reference, _ = build_policy(cfg, torch.device("cpu"))
    assert reference is None
    cfg = tiny_config(cold_tiny_dir, synthetic_ir, tmp_path / "z", "grpo.kl_coef=0.1")
    _, reference, _ = build_policy(cfg, torch.device("cpu"))
    assert not reference.training and not any(p.requires_grad for p in reference.parameters())


@pytest.mark.parametrize(
    "overrides",
    [("train.bf16=true",), ("model.gradient_checkpointing=true",), ("grpo.ppo_epochs=2",),
     ("grpo.loss_agg=token-mean", "grpo.kl_estimator=k1")],
    ids=["bf16-autocast", "gradient-checkpointing", "mu-2", "token-mean-k1"],
)  # fmt: skip
def test_options_run(cold_tiny_dir, synthetic_ir, tmp_path, overrides):
    cfg = tiny_config(cold_tiny_dir, synthetic_ir, tmp_path / "o", "train.steps=2", *overrides)
    final = train(cfg)
    rows = [json.loads(line) for line in (tmp_path / "o" / "metrics.jsonl").read_text().splitlines()]
    assert all(math.isfinite(r["loss"]) and math.isfinite(r["grad_norm"]) for r in rows)
    if cfg.grpo.ppo_epochs == 2:
        # the second pass sees a policy the first pass moved: the ratio leaves 1 (the metrics are the last pass's)
        assert any(r["ratio_max"] > 1.0 or r["ratio_min"] < 1.0 for r in rows)
    before, after = weights(Path(cold_tiny_dir)), weights(final)
    assert any(not torch.equal(before[k], after[k]) for k in before)


def test_answer_entropy_is_the_mean_surprise_of_the_sampled_answer_tokens(
    cold_tiny_dir, synthetic_ir, tmp_path
):
    """``answer_entropy`` in the step's metrics is −log π of each well-formed completion's answer
    token, averaged: recomputed here from the completions, the answer positions found from their
    text, and the log-probs of the policy that sampled them (lr 0, so the step leaves it as it
    was). Mutation checked by hand: reading the token before the answer fails it."""
    from data.imagereward import read_train
    from data.prompts import parse_completion
    from grpo.policy import build_policy
    from grpo.train import grpo_step
    from models.logprobs import completion_logprobs
    from models.qwen_vl import repeat_inputs

    ts = read_train(synthetic_ir)
    samples = ts.samples[:3]
    images = [[r.load() for r in s.images] for s in samples]
    cfg = tiny_config(cold_tiny_dir, synthetic_ir, tmp_path)
    cpu = torch.device("cpu")
    policy, reference, processor = build_policy(cfg, cpu)
    optimizer = torch.optim.AdamW(policy.parameters(), lr=0.0)
    torch.manual_seed(0)
    buf, metrics = grpo_step(policy, policy, reference, processor, optimizer, samples, images, ts.rating_values,
                             cfg, cpu)  # fmt: skip
    tok = processor.tokenizer
    inputs = encode_samples(processor, samples, images, ts.rating_values)
    with torch.no_grad():
        logp = completion_logprobs(policy, repeat_inputs(inputs, 4), buf.ids_NT, buf.mask_NT)
    surprise = []
    for n, text in enumerate(buf.texts):
        parsed = parse_completion(text, ts.rating_values)
        if parsed.well_formed:
            pieces = [tok.decode([i]) for i in buf.ids_NT[n][buf.mask_NT[n].bool()].tolist()]
            k = next(k for k in range(len(pieces)) if "".join(pieces[:k]).endswith("<answer>"))
            assert pieces[k].strip() == str(parsed.answer)
            surprise.append(-float(logp[n, k]))
    assert len(surprise) >= 6, "the cold-started model should mostly answer in the format"
    assert metrics["answer_entropy"] == pytest.approx(sum(surprise) / len(surprise), abs=1e-4)
