"""The GRPO family as options: Dr. GRPO, DAPO (clip-higher, token mean, dynamic sampling), GSPO,
batch-scaled advantages. Each against hand-computed values, each reduced to the paper's objective
at its neutral setting, dynamic sampling stopping at its budget, and every combination of the
configuration keys training on the tiny model."""

from __future__ import annotations

import dataclasses
import itertools
import json
import math

import pytest
import torch
from torch.testing import assert_close

from common.config import LOSS_TYPES, GRPOConfig, load_config
from grpo.advantages import ADVANTAGE_SCALINGS, batch_scaled_advantages, centred_advantages, group_advantages
from grpo.dynamic_sampling import choose_groups, sample_with_spread
from grpo.loss import budget_mean, grpo_loss, sequence_ratio
from grpo.rollout import RolloutBuffer, concat_groups

# ----------------------------------------------------------------------------- advantages


def test_centred_advantages_hand_computed():
    # Dr. GRPO: r − mean. [1, 0, 0, 1] → mean 0.5 → ±0.5 (GRPO would give ±0.866); a flat group → 0
    adv = centred_advantages(torch.tensor([[1.0, 0.0, 0.0, 1.0], [0.3, 0.3, 0.3, 0.3]]))
    assert_close(adv, torch.tensor([[0.5, -0.5, -0.5, 0.5], [0.0, 0.0, 0.0, 0.0]]))
    assert (adv[1] == 0).all()


def test_batch_scaled_advantages_hand_computed():
    # groups [1, 0] and [1, 1]: group means 0.5 and 1 → centred [0.5, −0.5, 0, 0]
    # batch std over [1, 0, 1, 1]: mean 0.75, squared deviations 0.0625 + 0.5625 + 0.0625 + 0.0625
    # = 0.75, unbiased var 0.75/3 = 0.25 → σ = 0.5 → A = ±0.5/(0.5 + 1e-4) = ±0.99980
    adv = batch_scaled_advantages(torch.tensor([[1.0, 0.0], [1.0, 1.0]]))
    a = 0.5 / (0.5 + 1e-4)
    assert_close(adv, torch.tensor([[a, -a], [0.0, 0.0]]))
    # the group std would have given ±0.5/(0.7071 + 1e-4) = ±0.7070 for the first group
    assert_close(
        group_advantages(torch.tensor([[1.0, 0.0]])), torch.tensor([[0.5, -0.5]]) / (0.5**0.5 + 1e-4)
    )


@pytest.mark.parametrize("seed", range(5))
def test_advantage_variants_reduce_to_the_papers(seed):
    g = torch.Generator().manual_seed(seed)
    rewards = torch.randint(0, 4, (6, 8), generator=g).double() / 4  # coarse rewards, some groups flat
    rewards[0] = 0.5  # one flat group for sure
    group = group_advantages(rewards)
    # batch scaling of a single group is the group scaling
    for b in range(6):
        assert_close(batch_scaled_advantages(rewards[b : b + 1]), group[b : b + 1])
    # the paper's advantage is Dr. GRPO's divided by the group's std (+ 1e-4)
    std = rewards.std(dim=1, keepdim=True)
    assert_close(centred_advantages(rewards) / (std + 1e-4), group)
    assert set(ADVANTAGE_SCALINGS) == {scaling for _, scaling in LOSS_TYPES.values()} | {
        "group",
        "batch",
        "none",
    }


# ----------------------------------------------------------------------------------- the loss


def test_decoupled_clip_hand_computed():
    # One token per completion, old log-prob 0, so ρ = exp(logp). ε_low = 0.2, ε_high = 0.28, β = 0, N = 4.
    #   A    ρ     ρA     clip(ρ, 0.8, 1.28)·A  surrogate  clipped   ∂loss/∂logp = −A·ρ/4 unless clipped
    #  +1   1.25   1.25   1.25                  1.25       no        −0.3125  (symmetric ε: clipped at 1.2)
    #  +1   1.30   1.30   1.28                  1.28       high      0
    #  −1   0.75  −0.75  −0.80                 −0.80       low       0
    #  −1   0.85  −0.85  −0.85                 −0.85       no        +0.2125
    # loss = −(1.25 + 1.28 − 0.80 − 0.85)/4 = −0.22
    ratios = torch.tensor([1.25, 1.30, 0.75, 0.85], dtype=torch.float64)
    adv = torch.tensor([1.0, 1.0, -1.0, -1.0], dtype=torch.float64)
    logp = ratios.log()[:, None].requires_grad_()
    old = torch.zeros(4, 1, dtype=torch.float64)
    loss, stats = grpo_loss(
        logp, old, None, adv, torch.ones(4, 1), clip_eps=0.2, kl_coef=0.0, clip_eps_high=0.28
    )
    loss.backward()
    assert_close(loss, torch.tensor(-0.22, dtype=torch.float64))
    assert_close(logp.grad, torch.tensor([[-0.3125], [0.0], [0.0], [0.2125]], dtype=torch.float64))
    assert stats["clip_frac"] == 0.5 and stats["clip_frac_low"] == 0.25 and stats["clip_frac_high"] == 0.25
    # the paper's symmetric clip caps the first token at 1.2 as well: −(1.2 + 1.2 − 0.8 − 0.85)/4 = −0.1875
    sym, sym_stats = grpo_loss(logp.detach(), old, None, adv, torch.ones(4, 1), clip_eps=0.2, kl_coef=0.0)
    assert_close(sym, torch.tensor(-0.1875, dtype=torch.float64))
    assert sym_stats["clip_frac_high"] == 0.5


def test_sequence_ratio_hand_computed():
    # GSPO: s_i = exp(mean_t (log π − log π_old)). Row 0: log-ratios (ln 1.44, 0) → s = √1.44 = 1.2;
    # row 1: (ln 0.64, 0) and a padding token holding garbage → s = 0.8.
    logp = torch.tensor([[math.log(1.44), 0.0, 0.0], [math.log(0.64), 0.0, 55.0]], dtype=torch.float64)
    mask = torch.tensor([[1, 1, 0], [1, 1, 0]], dtype=torch.bool)
    s = sequence_ratio(logp, torch.zeros_like(logp), mask)
    assert_close(s, torch.tensor([[1.2] * 3, [0.8] * 3], dtype=torch.float64))


def test_gspo_loss_and_gradient_hand_computed():
    # Same two completions, A = (+1, +1), ε = 0.1, β = 0, seq-mean over N = 2:
    #   row 0: s = 1.2 > 1.1 with A > 0 → clipped: surrogate 1.1, no gradient
    #   row 1: s = 0.8: min(0.8, 0.9) = 0.8, unclipped; ∂s/∂logp_1t = s · 1/|o_1| = 0.4 on each real
    #          token, so ∂loss/∂logp_1t = −A · 0.4 / N = −0.2; padding gets 0
    # loss = −(1.1 + 0.8)/2 = −0.95. Token-level, row 0 would clip only its first token (ρ = 1.44).
    logp = torch.tensor([[math.log(1.44), 0.0, 0.0], [math.log(0.64), 0.0, 55.0]], dtype=torch.float64)
    logp.requires_grad_()
    mask = torch.tensor([[1, 1, 0], [1, 1, 0]])
    adv = torch.tensor([1.0, 1.0], dtype=torch.float64)
    loss, stats = grpo_loss(logp, torch.zeros(2, 3, dtype=torch.float64), None, adv, mask, clip_eps=0.1,
                            kl_coef=0.0, importance_sampling_level="sequence")  # fmt: skip
    loss.backward()
    assert_close(loss, torch.tensor(-0.95, dtype=torch.float64))
    assert_close(logp.grad, torch.tensor([[0.0, 0.0, 0.0], [-0.2, -0.2, 0.0]], dtype=torch.float64))
    assert stats["clip_frac"] == 0.5 and stats["ratio_max"] == pytest.approx(1.2)


def test_budget_mean_hand_computed():
    # Dr. GRPO's normaliser: Σ_it x_it / (N · L). ρ ≡ 1, β = 0, so loss_it = −A_i.
    # A = (1, −2), lengths 3 and 1, L = 4, N = 2: loss = (−1·3 + 2·1)/(2·4) = −0.125
    # ∂loss/∂logp_it = −A_i/(N·L): −0.125 on row 0's tokens, +0.25 on row 1's one token
    mask = torch.tensor([[1, 1, 1], [1, 0, 0]], dtype=torch.bool)
    logp = torch.tensor([[-1.0, -2.0, -0.5], [-0.3, 80.0, -1e4]], requires_grad=True)
    loss, _ = grpo_loss(logp, None, None, torch.tensor([1.0, -2.0]), mask, kl_coef=0.0, loss_agg="budget-mean",
                        max_completion_len=4)  # fmt: skip
    loss.backward()
    assert_close(loss, torch.tensor(-0.125))
    assert_close(logp.grad, torch.tensor([[-0.125] * 3, [0.25, 0.0, 0.0]]))
    # the whole Dr. GRPO step on one group: rewards [1, 0, 0, 1] → A = ±0.5 (no std); lengths 2, 1, 1, 2,
    # L = 2: loss = −(0.5·2 − 0.5·1 − 0.5·1 + 0.5·2)/(4·2) = −1/8
    adv = centred_advantages(torch.tensor([[1.0, 0.0, 0.0, 1.0]])).flatten()
    mask = torch.tensor([[1, 1], [1, 0], [1, 0], [1, 1]], dtype=torch.bool)
    loss, _ = grpo_loss(torch.zeros(4, 2), None, None, adv, mask, kl_coef=0.0, loss_agg="budget-mean",
                        max_completion_len=2)  # fmt: skip
    assert_close(loss, torch.tensor(-0.125))
    assert_close(budget_mean(torch.ones(2, 3), torch.ones(2, 3, dtype=torch.bool), 6), torch.tensor(0.5))
    with pytest.raises(AssertionError, match="budget"):
        grpo_loss(torch.zeros(4, 2), None, None, adv, mask, kl_coef=0.0, loss_agg="budget-mean")


def random_batch(seed: int, N: int = 5, T: int = 6, ragged: bool = True):
    g = torch.Generator().manual_seed(seed)
    logp = -3 * torch.rand(N, T, generator=g, dtype=torch.float64)
    old = logp + 0.3 * torch.randn(N, T, generator=g, dtype=torch.float64)  # ρ spread over ~[0.5, 2]
    ref = logp + 0.3 * torch.randn(N, T, generator=g, dtype=torch.float64)
    adv = torch.randn(N, generator=g, dtype=torch.float64)
    lengths = torch.randint(1, T + 1, (N,), generator=g) if ragged else torch.full((N,), T)
    mask = torch.arange(T)[None, :] < lengths[:, None]
    return logp, old, ref, adv, mask


def loss_and_grad(logp, *args, **kwargs):
    logp = logp.clone().requires_grad_()
    loss, stats = grpo_loss(logp, *args, **kwargs)
    loss.backward()
    return loss.detach(), logp.grad, stats


@pytest.mark.parametrize("seed", range(6))
def test_each_variant_reduces_to_the_papers_objective_at_its_neutral_setting(seed):
    logp, old, ref, adv, mask = random_batch(seed)
    paper = loss_and_grad(logp, old, ref, adv, mask, 0.2, 0.04)
    # clip-higher with ε_high = ε is the symmetric clip, bit for bit
    sym = loss_and_grad(logp, old, ref, adv, mask, 0.2, 0.04, clip_eps_high=0.2)
    assert torch.equal(sym[0], paper[0]) and torch.equal(sym[1], paper[1]) and sym[2] == paper[2]
    # GSPO on policy (μ = 1: old = θ detached) is token-level GRPO under seq-mean, value and gradient
    on_policy = loss_and_grad(logp, None, ref, adv, mask, 0.2, 0.04)
    gspo = loss_and_grad(logp, None, ref, adv, mask, 0.2, 0.04, importance_sampling_level="sequence")
    assert_close(gspo[:2], on_policy[:2])
    # GSPO with one token per completion is token-level GRPO, clip included
    one = [t[:, :1] for t in (logp, old, ref)]
    single = loss_and_grad(one[0], one[1], one[2], adv, mask[:, :1], 0.2, 0.04)
    gspo1 = loss_and_grad(
        one[0], one[1], one[2], adv, mask[:, :1], 0.2, 0.04, importance_sampling_level="sequence"
    )
    assert_close(gspo1[:2], single[:2])
    # with every completion of the same length L, token-mean (DAPO, bnpo) and budget-mean with budget L
    # (Dr. GRPO) are the paper's seq-mean
    logp, old, ref, adv, mask = random_batch(seed, ragged=False)
    seq = loss_and_grad(logp, old, ref, adv, mask, 0.2, 0.04)
    for agg in ("token-mean", "budget-mean"):
        other = loss_and_grad(
            logp, old, ref, adv, mask, 0.2, 0.04, loss_agg=agg, max_completion_len=mask.shape[1]
        )
        assert_close(other[:2], seq[:2])


def test_config_resolves_each_loss_type_and_defaults_to_the_paper():
    g = GRPOConfig()
    assert (g.loss_type, g.aggregation, g.reward_scaling, g.clip_range, g.importance_sampling_level) == (
        "grpo", "seq-mean", "group", (0.2, 0.2), "token")  # fmt: skip
    assert not g.dynamic_sampling
    expected = {"grpo": ("seq-mean", "group"), "dr_grpo": ("budget-mean", "none"),
                "dapo": ("token-mean", "group"), "bnpo": ("token-mean", "batch")}  # fmt: skip
    for loss_type, parts in expected.items():
        cfg = load_config(None, [f"grpo.loss_type={loss_type}"])
        assert (cfg.grpo.aggregation, cfg.grpo.reward_scaling) == parts
    cfg = load_config(None, ["grpo.loss_type=dr_grpo", "grpo.scale_rewards=group", "grpo.clip_eps_high=0.28"])
    assert (cfg.grpo.aggregation, cfg.grpo.reward_scaling, cfg.grpo.clip_range) == (
        "budget-mean",
        "group",
        (0.2, 0.28),
    )
    for bad in ("grpo.loss_type=ppo", "grpo.importance_sampling_level=group", "grpo.scale_rewards=std",
                "grpo.clip_eps_low=1.5", "grpo.dynamic_sampling_max_rounds=-1"):  # fmt: skip
        with pytest.raises(ValueError, match=bad.split("=")[0].split(".")[1]):
            load_config(None, [bad])
    with pytest.raises(ValueError, match="dynamic_sampling"):
        load_config(None, ["grpo.dynamic_sampling=true", "train.strategy=fsdp"])


# ---------------------------------------------------------------------------- dynamic sampling


def test_choose_groups_keeps_spread_first_then_fills_with_flat():
    T, F = True, False
    # rounds of 3, 2 and 1 groups; spread at (0,0), (1,1), (2,0): exactly B = 3
    assert choose_groups([torch.tensor([F, T, T]), torch.tensor([T, F]), torch.tensor([F])], 3) == [
        [0],
        [1],
        [0],
    ]
    # budget ran out with one group of spread: it, then the first flat groups sampled
    assert choose_groups([torch.tensor([T, T, F]), torch.tensor([T, T])], 3) == [[0, 1, 2], []]


def fake_rollout(rewards_BG: torch.Tensor, tag: str) -> RolloutBuffer:
    """A scored rollout without a model: prompt b is ``b + 1`` tokens long, completions 2 tokens."""
    B, G = rewards_BG.shape
    L = B
    ids = torch.arange(L)[None, :].repeat(B, 1) + 10
    attention = (torch.arange(L)[None, :] >= (L - 1 - torch.arange(B))[:, None]).long()  # left padded
    inputs = {"input_ids": ids, "attention_mask": attention, "mm_token_type_ids": torch.zeros_like(ids)}
    N = B * G
    return RolloutBuffer(
        inputs, G, torch.ones(N, 2, dtype=torch.long), torch.ones(N, 2, dtype=torch.long),
        [f"{tag}{n}" for n in range(N)], torch.zeros(N, dtype=torch.bool), [f"{tag}-prompt{b}" for b in range(B)],
        rewards_N=rewards_BG.flatten(), components={"format": rewards_BG.flatten()},
    )  # fmt: skip


def test_dynamic_sampling_on_flat_rewards_stops_at_its_budget():
    B, G, rounds = 3, 4, 2
    draws = []

    def draw(k):
        draws.append(k)
        return [None] * k, [None] * k

    roll = lambda samples, images: fake_rollout(torch.zeros(len(samples), G), f"r{len(draws)}-")  # noqa: E731
    buf, sampled, stats = sample_with_spread(
        fake_rollout(torch.zeros(B, G), "r0-"), roll, draw, rounds, pad_id=0
    )
    assert draws == [B, B], (
        "each extra round replaces every missing group, and there are only `rounds` of them"
    )
    assert stats == {"dynamic_sampling/rounds": 2, "dynamic_sampling/extra_rollouts": 2 * B * G,
                     "dynamic_sampling/dropped_groups": 2 * B, "dynamic_sampling/flat_groups_trained": B,
                     "dynamic_sampling/budget_exhausted": 1.0}  # fmt: skip
    assert sampled.shape == (3 * B, G) and buf.num_completions == B * G, "trains on B groups, all it had"
    assert buf.texts[0] == "r0-0", "the flat groups first sampled fill the batch"


def test_dynamic_sampling_without_flat_groups_is_the_papers_step():
    first = fake_rollout(torch.tensor([[1.0, 0.0], [0.5, 1.0]]), "a")

    def never(*_):
        raise AssertionError("no group is flat: nothing may be drawn or sampled")

    buf, sampled, stats = sample_with_spread(first, never, never, 3, pad_id=0)
    assert buf is first and torch.equal(sampled, first.rewards_N.view(2, 2))
    assert stats["dynamic_sampling/rounds"] == 0 and stats["dynamic_sampling/extra_rollouts"] == 0


def test_dynamic_sampling_replaces_flat_groups_with_fresh_ones():
    G = 2
    first = fake_rollout(torch.tensor([[1.0, 0.0], [1.0, 1.0], [0.5, 0.5]]), "a")  # groups 1 and 2 flat
    more = [fake_rollout(torch.tensor([[0.0, 0.0], [0.0, 1.0]]), "b"),  # 2 drawn, group 1 has spread
            fake_rollout(torch.tensor([[1.0, 0.0]]), "c")]  # 1 drawn, it has spread  # fmt: skip
    draws = []

    def draw(k):
        draws.append(k)
        return [None] * k, [None] * k

    buf, sampled, stats = sample_with_spread(first, lambda s, i: more[len(draws) - 1], draw, 3, pad_id=0)
    assert draws == [2, 1], "each round draws as many fresh prompts as groups are missing"
    assert stats == {"dynamic_sampling/rounds": 2, "dynamic_sampling/extra_rollouts": 3 * G,
                     "dynamic_sampling/dropped_groups": 3, "dynamic_sampling/flat_groups_trained": 0,
                     "dynamic_sampling/budget_exhausted": 0.0}  # fmt: skip
    assert sampled.shape == (6, G)
    assert buf.samples == ["a-prompt0", "b-prompt1", "c-prompt0"]
    assert_close(buf.rewards_N, torch.tensor([1.0, 0.0, 0.0, 1.0, 1.0, 0.0]))
    assert buf.texts == ["a0", "a1", "b2", "b3", "c0", "c1"]


def test_concat_groups_pads_prompts_left_and_completions_right():
    a = fake_rollout(torch.tensor([[1.0, 0.0], [0.0, 1.0]]), "a")
    b = fake_rollout(torch.tensor([[1.0, 0.0], [0.0, 1.0], [1.0, 1.0]]), "b")
    b.ids_NT, b.mask_NT = torch.ones(6, 4, dtype=torch.long), torch.ones(6, 4, dtype=torch.long)
    merged = concat_groups([(a, [1]), (b, [0, 2])], pad_id=7)
    assert merged.samples == ["a-prompt1", "b-prompt0", "b-prompt2"] and merged.texts[:2] == ["a2", "a3"]
    assert merged.inputs["input_ids"].shape == (3, 3) and merged.ids_NT.shape == (6, 4)
    assert merged.inputs["input_ids"][0].tolist() == [7, 10, 11], "a's prompt 1 (2 tokens) padded on the left"
    assert merged.inputs["attention_mask"][0].tolist() == [0, 1, 1]
    assert merged.ids_NT[0].tolist() == [1, 1, 7, 7] and merged.mask_NT[0].tolist() == [1, 1, 0, 0]


# ------------------------------------------------------------------- training on the tiny model


def run_metrics(out) -> list[dict]:
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]


def tiny(model_dir, data_root, out, *overrides):
    base = [f"model.name_or_path={model_dir}", "model.dtype=float32", f"data.root={data_root}",
            f"train.output_dir={out}", "train.device=cpu", "train.steps=1", "train.lr=1e-3", "train.warmup_steps=1",
            "train.save_every=0", "grpo.group_size=4", "grpo.prompts_per_step=2", "grpo.max_new_tokens=16",
            "grpo.minibatch_size=8", "grpo.kl_coef=0.04", "grpo.ppo_epochs=2", "eval.every=0"]  # fmt: skip
    return load_config("experiments/tiny.yaml", base + list(overrides))


def test_dynamic_sampling_trains_on_a_flat_reward_and_stops_at_its_budget(
    cold_tiny_dir, synthetic_ir, tmp_path, one_thread
):
    """Every reward weighted 0: every group is flat. Each step runs exactly its 2 extra rounds,
    trains on the B groups it has, and says so in metrics.jsonl."""
    from grpo.train import train

    train(tiny(cold_tiny_dir, synthetic_ir, tmp_path, "train.steps=2", "grpo.dynamic_sampling=true",
               "grpo.dynamic_sampling_max_rounds=2", "grpo.reward_weights={format: 0, exact: 0, approx: 0}"))  # fmt: skip
    for r in run_metrics(tmp_path):
        assert r["frac_reward_zero_std"] == r["frac_zero_std"] == 1.0
        assert r["dynamic_sampling/rounds"] == 2 and r["dynamic_sampling/budget_exhausted"] == 1.0
        assert (
            r["dynamic_sampling/extra_rollouts"] == 2 * 2 * 4
            and r["dynamic_sampling/flat_groups_trained"] == 2
        )
        assert math.isfinite(r["loss"]) and r["adv_abs_max"] == 0.0


COMBINATIONS = list(
    itertools.product(["grpo", "dr_grpo", "dapo", "bnpo"], ["token", "sequence"], [None, 0.28], [False, True])
)


def test_every_combination_trains_and_logs_frac_reward_zero_std(
    cold_tiny_dir, synthetic_ir, tmp_path, one_thread
):
    """The contract: each combination of grpo.loss_type × grpo.importance_sampling_level ×
    grpo.clip_eps_high × grpo.dynamic_sampling trains (one step, μ = 2 so that the ratio and the
    clip act) on the tiny model and logs ``frac_reward_zero_std`` and the clip ratios in metrics.jsonl."""
    from grpo.train import train

    for loss_type, level, high, ds in COMBINATIONS:
        out = tmp_path / f"{loss_type}-{level}-{high}-{ds}"
        extra = [
            f"grpo.loss_type={loss_type}",
            f"grpo.importance_sampling_level={level}",
            f"grpo.dynamic_sampling={ds}",
        ]
        train(
            tiny(cold_tiny_dir, synthetic_ir, out, *extra, *([f"grpo.clip_eps_high={high}"] if high else []))
        )
        (row,) = run_metrics(out)
        assert 0.0 <= row["frac_reward_zero_std"] <= 1.0 and math.isfinite(row["loss"]), out.name
        assert {"clip_frac_low", "clip_frac_high"} <= set(row)
        assert ("dynamic_sampling/rounds" in row) == ds


def test_concat_groups_scores_each_completion_as_its_own_rollout_did(tiny, synthetic_ir, one_thread):
    """The refilled batch of dynamic sampling re-pads prompts (with their packed images) and
    completions of two rollouts; every completion's log-probs under the tiny model must be the
    ones its own rollout gives it (the left padding moves no position). Mutation checked by hand:
    padding the prompts on the right fails it."""
    from data.imagereward import read_train
    from grpo.rollout import buffer_logprobs, encode_samples

    model, processor = tiny
    ts = read_train(synthetic_ir)
    g = torch.Generator().manual_seed(0)

    def buffer(samples, T):
        images = [[r.load() for r in s.images] for s in samples]
        N = 2 * len(samples)
        ids = torch.randint(50, 400, (N, T), generator=g)
        mask = (torch.arange(T)[None, :] < torch.randint(1, T + 1, (N,), generator=g)[:, None]).long()
        return RolloutBuffer(encode_samples(processor, samples, images, ts.rating_values), 2, ids, mask,
                             [""] * N, torch.zeros(N, dtype=torch.bool), samples, rewards_N=torch.zeros(N))  # fmt: skip

    longer = [
        dataclasses.replace(s, prompt=s.prompt + " on a wide field, seen from far away")
        for s in ts.samples[5:7]
    ]
    a, b = buffer(ts.samples[:3], 6), buffer(longer, 4)
    assert a.inputs["input_ids"].shape[1] < b.inputs["input_ids"].shape[1], "a's prompts get left padding"
    merged = concat_groups([(a, [0, 2]), (b, [1])], processor.tokenizer.pad_token_id)
    got = buffer_logprobs(model, merged, 8, 1.0)
    want_a, want_b = buffer_logprobs(model, a, 8, 1.0), buffer_logprobs(model, b, 8, 1.0)
    mask = merged.mask_NT.bool()
    want = torch.zeros_like(got)
    want[:4, :6] = want_a[[0, 1, 4, 5]]
    want[4:, :4] = want_b[[2, 3]]
    assert_close(got[mask], want[mask], atol=1e-5, rtol=1e-5)


def test_every_ablation_variant_is_a_valid_configuration():
    """``make ablate`` trains each of ``experiments/ablate.py``'s variants on both demo tasks."""
    from experiments.ablate import PAPER, TASKS, VARIANTS

    assert VARIANTS["grpo"] == (), "the baseline is the paper's GRPO, unchanged"
    for config, _, _ in TASKS.values():
        for variant, overrides in VARIANTS.items():
            g = load_config(f"experiments/{config}", ["grpo.ppo_epochs=2", *PAPER, *overrides]).grpo
            papers = (g.loss_type, g.importance_sampling_level, g.clip_range, g.dynamic_sampling) == (
                "grpo", "token", (0.2, 0.2), False)  # fmt: skip
            assert papers == (variant == "grpo"), variant
    gspo = load_config("experiments/tiny.yaml", list(VARIANTS["gspo"])).grpo
    assert gspo.clip_range == (3e-4, 4e-4) and gspo.importance_sampling_level == "sequence"


@pytest.mark.parametrize("agg", ["seq-mean", "token-mean", "budget-mean"])
def test_each_aggregation_is_exact_across_minibatches(tiny, synthetic_ir, one_thread, agg):
    """One SGD step (lr 1: every weight moves by its gradient) over the whole batch at once and
    over minibatches of 4 completions must agree: minibatches weigh by their share of the
    completions, or of the tokens for token-mean (DAPO's one mean over the batch's tokens).
    Mutation checked by hand: weighting token-mean's minibatches by completions fails it."""
    import copy

    from data.imagereward import read_train
    from grpo.rollout import encode_samples
    from grpo.train import update_pass

    model, processor = tiny
    ts = read_train(synthetic_ir)
    samples = ts.samples[:3]
    inputs = encode_samples(
        processor, samples, [[r.load() for r in s.images] for s in samples], ts.rating_values
    )
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(50, 400, (6, 7), generator=g)
    mask = (torch.arange(7)[None, :] < torch.tensor([7, 1, 2, 7, 3, 1])[:, None]).long()  # ragged lengths
    moved = []
    for minibatch in (6, 4):
        cfg = load_config(None, ["grpo.group_size=2", f"grpo.minibatch_size={minibatch}", "grpo.kl_coef=0.1",
                                 "model.dtype=float32", f"grpo.loss_agg={agg}", "grpo.max_new_tokens=8",
                                 "train.max_grad_norm=1e9"])  # fmt: skip
        m = copy.deepcopy(model).train()
        buf = RolloutBuffer(inputs, 2, ids, mask, [""] * 6, torch.zeros(6, dtype=torch.bool), samples)
        buf.advantages_N = torch.tensor([1.0, -1.0, 0.5, -0.5, 2.0, -2.0])
        buf.ref_logp_NT = torch.full((6, 7), -6.5)
        update_pass(m, torch.optim.SGD(m.parameters(), lr=1.0), buf, cfg, torch.device("cpu"))
        moved.append({n: p.detach() for n, p in m.named_parameters()})
    assert any(not torch.equal(moved[0][n], p) for n, p in model.named_parameters())
    for name in moved[0]:
        assert_close(moved[1][name], moved[0][name], atol=1e-5, rtol=1e-4, msg=name)
