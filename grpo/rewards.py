"""Rule-based rewards (arXiv 2503.19948): pure functions of (completion text, target).

A completion must read ``<think>…</think><answer>N</answer>``; ``data.prompts.parse_completion``
is the single strict definition of that format. Every reward below is 0 for a malformed
completion, so the model can never earn accuracy credit without the format.

| name     | reward                                                    | tasks         |
|----------|-----------------------------------------------------------|---------------|
| format   | 1 if well formed else 0                                   | rating, pair  |
| exact    | 1 if the answer equals the target else 0                  | rating, pair  |
| approx   | 1, 0.75, 0.5 for |answer − target| = 0, 1, 2; else 0       | rating        |

The total reward of a completion is the weighted sum of its task's components (weights 1.0 by
default). Shape key: ``N`` completions.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence

import torch
from torch import Tensor

from data.prompts import parse_completion

DIGITS: tuple[int, ...] = tuple(range(10))

# |answer − target| → approximate-match reward; any larger distance earns 0.
APPROX_CREDIT: dict[int, float] = {0: 1.0, 1: 0.75, 2: 0.5}


def _check_target(target: int, valid_answers: Sequence[int]) -> None:
    if target not in valid_answers:
        raise ValueError(f"target {target!r} is not one of the valid answers {tuple(valid_answers)}")


def format_reward(text: str, valid_answers: Sequence[int] = DIGITS) -> float:
    """1.0 iff the completion is well formed (one think block, one answer in ``valid_answers``)."""
    return 1.0 if parse_completion(text, tuple(valid_answers)).well_formed else 0.0


def exact_match_reward(text: str, target: int, valid_answers: Sequence[int] = DIGITS) -> float:
    """1.0 iff the completion is well formed and its answer equals ``target``."""
    _check_target(target, valid_answers)
    parsed = parse_completion(text, tuple(valid_answers))
    return 1.0 if parsed.well_formed and parsed.answer == target else 0.0


def approx_match_reward(text: str, target: int, valid_answers: Sequence[int] = DIGITS) -> float:
    """Partial credit for a near miss: d = |answer − target| → 1.0 (d=0), 0.75 (1), 0.5 (2), else 0.

    A malformed completion earns 0.
    """
    _check_target(target, valid_answers)
    parsed = parse_completion(text, tuple(valid_answers))
    if not parsed.well_formed:
        return 0.0
    return APPROX_CREDIT.get(abs(parsed.answer - target), 0.0)


# One uniform signature (text, target, valid_answers) per component, so that compute_rewards can
# call them alike; the format reward ignores the target.
REWARD_FNS: dict[str, Callable[[str, int, Sequence[int]], float]] = {
    "format": lambda text, target, valid_answers: format_reward(text, valid_answers),
    "exact": exact_match_reward,
    "approx": approx_match_reward,
}

TASK_REWARDS: dict[str, tuple[str, ...]] = {
    "rating": ("format", "exact", "approx"),
    "pair": ("format", "exact"),
}


def compute_rewards(
    texts: Sequence[str],
    targets: Sequence[int],
    task: str,
    valid_answers: Sequence[int],
    weights: Mapping[str, float] | None = None,
) -> tuple[Tensor, dict[str, Tensor]]:
    """Rewards of N completions: r_i = Σ_c w_c · reward_c(text_i, target_i) over the task's components.

    | argument      | shape / type                                                   |
    |---------------|----------------------------------------------------------------|
    | texts         | N completion strings                                           |
    | targets       | N ints, each in ``valid_answers``                              |
    | task          | ``"rating"`` or ``"pair"`` (selects the components, TASK_REWARDS) |
    | weights       | component → w_c; missing components default to 1.0; a name that is |
    |               | not a component of this task is an error                       |
    | returns       | total_N (N,) float32, {component: (N,) float32, unweighted}      |
    """
    if task not in TASK_REWARDS:
        raise ValueError(f"unknown task {task!r}; expected one of {sorted(TASK_REWARDS)}")
    if len(texts) != len(targets):
        raise ValueError(f"{len(texts)} completions but {len(targets)} targets")
    names = TASK_REWARDS[task]
    weights = dict(weights or {})
    unknown = sorted(set(weights) - set(names))
    if unknown:
        raise ValueError(f"reward weights {unknown} are not components of task {task!r} {names}")
    valid_answers = tuple(valid_answers)

    components = {
        name: torch.tensor(
            [REWARD_FNS[name](text, target, valid_answers) for text, target in zip(texts, targets)],
            dtype=torch.float32,
        )  # (N,)
        for name in names
    }
    total_N = torch.zeros(len(texts), dtype=torch.float32)
    for name in names:
        total_N = total_N + weights.get(name, 1.0) * components[name]
    return total_N, components
