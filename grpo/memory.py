"""The memory plan of a run, before any GPU is touched: ``python -m grpo.memory CONFIG.yaml [key=value ...]
--gpus N --gpu-memory GiB [--json]``.

Prints, per rank, the bytes of every resident state and the transient peak of each phase of a GRPO
step, whether the run fits, and which knob to turn if not. How each figure is counted:
``grpo.run.memory_plan``.
"""

from __future__ import annotations

import argparse
import json
import sys

from common.config import load_config
from common.errors import user_errors_exit
from grpo.run import memory_plan
from grpo.run.memory_plan import PROMPT_TEXT_TOKENS, GiB, format_plan, plan_for_config


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], epilog=memory_plan.__doc__.split("\n\n", 1)[1],
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )  # fmt: skip
    parser.add_argument("config", help="experiment YAML, e.g. experiments/imagereward.yaml")
    parser.add_argument("overrides", nargs="*", help="section.key=value, e.g. train.strategy=fsdp")
    parser.add_argument("--gpus", type=int, default=1, help="ranks (GPUs) of the run (default 1)")
    parser.add_argument("--gpu-memory", type=float, default=80.0, help="GiB per GPU (default 80)")
    parser.add_argument("--prompt-tokens", type=int, default=PROMPT_TEXT_TOKENS,
                        help=f"text tokens of a prompt, images excluded (default {PROMPT_TEXT_TOKENS})")  # fmt: skip
    parser.add_argument(
        "--image-tokens", type=int, default=0, help="tokens per image (default: the pixel cap)"
    )
    parser.add_argument("--json", action="store_true", help="print the plan as one JSON object")
    args = parser.parse_args(argv)
    if args.gpus < 1 or args.gpu_memory <= 0:
        parser.exit(2, "error: --gpus must be ≥ 1 and --gpu-memory > 0\n")
    with user_errors_exit():
        cfg = load_config(args.config, args.overrides)
        p = plan_for_config(cfg, args.gpus, args.gpu_memory * GiB, prompt_tokens=args.prompt_tokens,
                            image_tokens=args.image_tokens)  # fmt: skip
    print(json.dumps(p, indent=1) if args.json else format_plan(p))


if __name__ == "__main__":
    sys.exit(main())
