"""Prompt templates for the two tasks, and the parser for the model's answer.

The model is asked to reason inside ``<think>…</think>`` and then answer inside
``<answer>…</answer>`` (arXiv 2503.19948). Two tasks:

- **rating** (ImageReward): one image and its prompt; the answer is one integer on the
  dataset's rating scale, e.g. 1…7. The scale is a parameter: it is read from the data.
- **pair** (HPSv2): two images of the same prompt; the answer is ``0`` (the first image is
  better) or ``1`` (the second image is better).

``messages_for`` builds the chat messages (one ``{"type": "image"}`` entry per image, so the
chat template renders one vision block per image). ``parse_completion`` is the single strict
definition of a well-formed answer; the format reward and the hard score both use it.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

THINK_OPEN, THINK_CLOSE = "<think>", "</think>"
ANSWER_OPEN, ANSWER_CLOSE = "<answer>", "</answer>"

RATING_TEMPLATE = (
    "You are an expert judge of images generated from text prompts. "
    'The prompt was: "{prompt}". '
    "Rate how much people would like this image for the prompt, on a scale from {low} (worst) to {high} (best). "
    "First think step by step inside <think> </think> tags, "
    "then give only the rating, one integer, inside <answer> </answer> tags."
)

PAIR_TEMPLATE = (
    "You are an expert judge of images generated from text prompts. "
    'The prompt was: "{prompt}". '
    "Here are two images generated for it: image 0 comes first and image 1 comes second. "
    "Which image would people prefer? "
    "First think step by step inside <think> </think> tags, "
    "then answer inside <answer> </answer> tags with 0 if the first image is better "
    "or 1 if the second image is better."
)

# Exactly one think block, then exactly one answer block, then nothing but white space.
_STRICT = re.compile(
    r"\s*<think>(?P<think>(?:(?!<think>|</think>|<answer>|</answer>).)*)</think>\s*"
    r"<answer>(?P<answer>(?:(?!<think>|</think>|<answer>|</answer>).)*)</answer>\s*",
    re.DOTALL,
)


def rating_prompt(prompt: str, low: int, high: int) -> str:
    """The user text of the single-image rating task for a scale ``low…high``."""
    return RATING_TEMPLATE.format(prompt=prompt, low=low, high=high)


def pair_prompt(prompt: str) -> str:
    """The user text of the pairwise task (answer 1 = the second image is preferred)."""
    return PAIR_TEMPLATE.format(prompt=prompt)


def messages_for(task: str, prompt: str, n_images: int, rating_values: tuple[int, ...] = ()) -> list[dict]:
    """Chat messages for one example: the images first, then the instruction.

    ``task`` is ``"rating"`` (one image; ``rating_values`` is the scale) or ``"pair"`` (two images).
    """
    if not prompt or not prompt.strip():
        raise ValueError("empty prompt")
    if task == "rating":
        if n_images != 1:
            raise ValueError(f"the rating task takes 1 image, got {n_images}")
        text = rating_prompt(prompt, min(rating_values), max(rating_values))
    elif task == "pair":
        if n_images != 2:
            raise ValueError(f"the pair task takes 2 images, got {n_images}")
        text = pair_prompt(prompt)
    else:
        raise ValueError(f"unknown task {task!r}; expected 'rating' or 'pair'")
    content = [{"type": "image"} for _ in range(n_images)] + [{"type": "text", "text": text}]
    return [{"role": "user", "content": content}]


def answer_values(task: str, rating_values: tuple[int, ...] = ()) -> tuple[int, ...]:
    """The answers that count as valid for a task: the rating scale, or (0, 1)."""
    if task == "pair":
        return (0, 1)
    if task == "rating":
        if not rating_values:
            raise ValueError("the rating task needs its rating scale")
        return tuple(rating_values)
    raise ValueError(f"unknown task {task!r}")


@dataclass(frozen=True)
class ParsedCompletion:
    """What a completion says. ``answer`` is None unless the format is strictly right."""

    well_formed: bool
    answer: int | None
    reasoning: str


def parse_completion(text: str, valid_answers: tuple[int, ...]) -> ParsedCompletion:
    """Parse ``<think>…</think><answer>N</answer>`` strictly.

    Well formed means: exactly one think block followed by exactly one answer block, nothing
    but white space around them, and the answer is one integer in ``valid_answers`` written in
    plain ASCII digits without sign or leading zeros (white space around it is allowed). An empty, non-numeric or out-of-range answer is not well formed.
    """
    m = _STRICT.fullmatch(text)
    if m is None:
        return ParsedCompletion(False, None, _reasoning_of(text))
    reasoning = m.group("think").strip()
    raw = m.group("answer").strip()
    if (
        not re.fullmatch(r"0|[1-9][0-9]*", raw) or int(raw) not in valid_answers
    ):  # ASCII, no sign, no 0-padding
        return ParsedCompletion(False, None, reasoning)
    return ParsedCompletion(True, int(raw), reasoning)


def _reasoning_of(text: str) -> str:
    """Best-effort reasoning text of a malformed completion (for logs and the rank table)."""
    start = text.find(THINK_OPEN)
    end = text.find(THINK_CLOSE, start + 1)
    if start >= 0 and end > start:
        return text[start + len(THINK_OPEN) : end].strip()
    return text.strip()
