"""Dynamic sampling (DAPO, Yu et al., arXiv 2503.14476 §3.2), with a budget: ``grpo.dynamic_sampling``.

A group whose G rewards all agree has zero std, so every advantage in it is 0 and it adds no
policy gradient, only dilution (and the KL term). Our rating reward takes few values, so such
groups are common (``frac_reward_zero_std`` in ``metrics.jsonl``). DAPO keeps sampling until the
batch holds B groups with spread:

    keep group b  ⇔  std(r_b1..r_bG) > 0        (judged by the std, never by the mean reward)

Here a step samples its B prompts; while fewer than B groups have spread and the budget
(``grpo.dynamic_sampling_max_rounds`` extra rounds) lasts, it samples one more round of as many
fresh prompts (the rank's own sample stream) as groups are missing. It never loops past the
budget: a step that runs out trains on the groups with spread plus the first flat groups
sampled, so the batch always holds B groups (and DDP ranks always run the same passes), and logs
it. Metrics, all per step:

| key | meaning |
|---|---|
| ``dynamic_sampling/rounds`` | extra sampling rounds run (≤ the budget) |
| ``dynamic_sampling/extra_rollouts`` | completions sampled in those rounds |
| ``dynamic_sampling/dropped_groups`` | flat groups sampled and not trained on |
| ``dynamic_sampling/flat_groups_trained`` | flat groups kept because the budget ran out |
| ``dynamic_sampling/budget_exhausted`` | 1 when the budget ran out with flat groups in the batch |
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor

from grpo.advantages import zero_spread
from grpo.rollout import RolloutBuffer, concat_groups


def choose_groups(flat_per_round: list[Tensor], B: int) -> list[list[int]]:
    """Which groups of each sampling round a step trains on, as group indices per round.

    The groups with spread in the order they were sampled, the first B of them; when there are
    fewer than B, the flat groups first sampled fill the batch. ``flat_per_round[r]`` is the
    bool ``(B_r,)`` zero-spread flag of round r's groups.
    """
    order = [(r, b) for r, flat in enumerate(flat_per_round) for b in range(len(flat))]
    spread = [rb for rb in order if not flat_per_round[rb[0]][rb[1]]]
    flat = [rb for rb in order if flat_per_round[rb[0]][rb[1]]]
    chosen = set((spread + flat)[:B])
    return [[b for b in range(len(flat)) if (r, b) in chosen] for r, flat in enumerate(flat_per_round)]


def sample_with_spread(
    first: RolloutBuffer,
    rollout: Callable[[list, list], RolloutBuffer],
    draw: Callable[[int], tuple[list, list]],
    max_rounds: int,
    pad_id: int,
) -> tuple[RolloutBuffer, Tensor, dict[str, float]]:
    """Replace the zero-spread groups of ``first`` (a scored rollout of B prompts) with groups of
    fresh prompts, at most ``max_rounds`` extra rounds.

    ``draw(k)`` returns k fresh (samples, images); ``rollout(samples, images)`` samples and
    rewards their groups. Returns the batch to train on (B groups), the rewards of every group
    sampled in the step ``(B + dropped, G)`` (for ``frac_reward_zero_std`` and the reward
    figures) and the ``dynamic_sampling/…`` metrics.
    """
    G = first.group_size
    B = first.num_completions // G
    rounds = [first]
    flat = [zero_spread(first.rewards_N.view(B, G))]
    missing = int(sum(f.sum() for f in flat))
    while missing > 0 and len(rounds) <= max_rounds:
        samples, images = draw(missing)
        rounds.append(rollout(samples, images))
        flat.append(zero_spread(rounds[-1].rewards_N.view(-1, G)))
        missing -= int((~flat[-1]).sum())
    chosen = choose_groups(flat, B)
    flat_trained = sum(int(f[c].sum()) for f, c in zip(flat, chosen, strict=True) if c)
    sampled = sum(len(f) for f in flat)
    stats = {
        "dynamic_sampling/rounds": len(rounds) - 1,
        "dynamic_sampling/extra_rollouts": (sampled - B) * G,
        "dynamic_sampling/dropped_groups": sampled - B,
        "dynamic_sampling/flat_groups_trained": flat_trained,
        "dynamic_sampling/budget_exhausted": float(flat_trained > 0),
    }
    sampled_BG = torch.cat([r.rewards_N.view(-1, G) for r in rounds])  # (B + dropped, G)
    if len(rounds) == 1:
        return first, sampled_BG, stats  # nothing was dropped: the batch is the first rollout
    return concat_groups(list(zip(rounds, chosen, strict=True)), pad_id), sampled_BG, stats
