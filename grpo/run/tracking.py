"""Watching a run live: TensorBoard and Weights & Biases under TRL's metric names (``train.report_to``).

The step's metrics (``metrics.jsonl``, written by ``grpo.run.checkpoint.log_step``) are sent to
the trackers the user named, through the libraries themselves: ``torch.utils.tensorboard``
(event files under ``OUTPUT_DIR/tensorboard``) and ``wandb`` (the optional extra; with
``WANDB_MODE=offline`` it writes its run folder under ``OUTPUT_DIR/wandb`` and nothing leaves the
machine). Nothing is sent anywhere the user did not name. Only rank 0 logs.

**Names.** A quantity TRL's ``GRPOTrainer`` also logs gets TRL's name (``TRL_NAMES``), under the
``train/`` prefix that the Hugging Face trainer's TensorBoard and wandb callbacks add, so a curve of
this project and one of a TRL run overlay under one tag: ``train/reward``, ``train/kl``,
``train/clip_ratio/region_mean``, ``train/rewards/format/mean`` … Quantities TRL has no name for
keep the ``metrics.jsonl`` key (``train/time/generate``, ``train/tokens_per_s``); held-out
figures keep theirs (``eval/…``). docs/monitoring.md lists every one and how to read it.

**One curve across restarts.** Each process opens its writer with ``purge_step`` = its first
step (a session start event): for a run resumed from a checkpoint at step S, TensorBoard then
hides every event of step > S that the interrupted process had written after its last
checkpoint, so each step has exactly one value (the resumed process logs those steps again, and
a bit-exact resume logs the same values). The wandb run keeps one id
(``OUTPUT_DIR/wandb-run-id``) and is resumed under it. The resolved config and the git commit are
logged once, when the run starts at step 0 (TensorBoard text ``run/config``, ``run/git``; wandb's
run config).

**Sample tables** every ``train.samples_every`` steps: prompt, the images as thumbnails,
completion, reward and advantage of the step's first ``train.log_completions`` completions
(TensorBoard: a markdown text table ``samples`` and the thumbnails ``samples/image_N``; wandb: a
``wandb.Table``).
"""

from __future__ import annotations

import os
import resource
import subprocess
import time
import uuid
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import torch
import yaml

from common.config import Config, to_dict

# metrics.jsonl key → TRL GRPOTrainer's name for the same quantity
TRL_NAMES = {
    "reward_mean": "reward",
    "frac_zero_std": "frac_reward_zero_std",
    "completion_len_mean": "completions/mean_length",
    "completion_len_min": "completions/min_length",
    "completion_len_max": "completions/max_length",
    "frac_truncated": "completions/clipped_ratio",
    "clip_frac": "clip_ratio/region_mean",
    "clip_frac_low": "clip_ratio/low_mean",
    "clip_frac_high": "clip_ratio/high_mean",
    "lr": "learning_rate",
}
THUMBNAIL = 96  # longest side of a sample table's image thumbnails, in pixels
REPO = Path(__file__).resolve().parents[2]


def tag(key: str) -> str:
    """The tracker tag of a ``metrics.jsonl`` key: ``reward_mean`` → ``train/reward``,
    ``reward/format`` → ``train/rewards/format/mean``, ``eval/…`` unchanged."""
    if key.startswith("eval/"):
        return key
    if key.startswith("reward/"):
        return f"train/rewards/{key[len('reward/') :]}/mean"
    return "train/" + TRL_NAMES.get(key, key)


@contextmanager
def timed(timings: dict, key: str):
    """Add the block's wall time to ``timings[key]`` (seconds)."""
    start = time.perf_counter()
    yield
    timings[key] = timings.get(key, 0.0) + time.perf_counter() - start


def flatten(d: dict, prefix: str = "") -> dict:
    """``{"a": {"b": 1}}`` → ``{"a/b": 1}``."""
    out = {}
    for k, v in d.items():
        if isinstance(v, dict):
            out.update(flatten(v, f"{prefix}{k}/"))
        else:
            out[f"{prefix}{k}"] = v
    return out


def peak_memory(device: torch.device) -> dict[str, float]:
    """Peak memory so far, GiB: the process's resident set (``memory/peak_rss_gib``) and, on a GPU,
    the most ever allocated by torch on it (``memory/peak_gpu_gib``)."""
    out = {"memory/peak_rss_gib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20}  # KiB on Linux
    if device.type == "cuda":
        out["memory/peak_gpu_gib"] = torch.cuda.max_memory_allocated(device) / 2**30
    return out


def git_commit() -> str:
    """``HEAD`` of the checkout this code runs from, ``+dirty`` if it has changes; ``unknown`` outside git."""
    try:
        head = subprocess.run(["git", "-C", str(REPO), "rev-parse", "HEAD"], capture_output=True, text=True,
                              timeout=10, check=True).stdout.strip()  # fmt: skip
        dirty = subprocess.run(["git", "-C", str(REPO), "status", "--porcelain", "--untracked-files=no"],
                               capture_output=True, text=True, timeout=10, check=True).stdout.strip()  # fmt: skip
    except (OSError, subprocess.SubprocessError):
        return "unknown"
    return head + ("+dirty" if dirty else "")


class Tracker:
    """The trackers of one run (none on ranks > 0, or when ``train.report_to`` names none)."""

    def __init__(self, cfg: Config, out: Path, start: int, enabled: bool = True) -> None:
        """Open the named trackers for a run that continues after step ``start`` (0: a new run)."""
        names = set(cfg.train.report_to) - {"none"} if enabled else set()
        self.tb = self.wandb = None
        self.samples_every, self.n_samples = cfg.train.samples_every, cfg.train.log_completions
        if not names:
            return
        config, commit = to_dict(cfg), git_commit()
        if "tensorboard" in names:
            from torch.utils.tensorboard import SummaryWriter

            # Every process writes a session start at its first step: TensorBoard reads a later start
            # as a restart and hides the earlier events of that step and after.
            self.tb = SummaryWriter(str(out / "tensorboard"), purge_step=start + 1)
            if start == 0:
                self.tb.add_text(
                    "run/config", "```yaml\n" + yaml.safe_dump(config, sort_keys=False) + "```", 0
                )
                self.tb.add_text("run/git", commit, 0)
        if "wandb" in names:
            import wandb  # installed: Config.validate checks it

            id_file = out / "wandb-run-id"
            run_id = id_file.read_text().strip() if id_file.exists() else uuid.uuid4().hex[:8]
            id_file.write_text(run_id + "\n")
            project = os.environ.get("WANDB_PROJECT", "visual-preference-grpo")
            self.wandb = wandb.init(project=project, name=out.name, dir=str(out), id=run_id, resume="allow",
                                    config={**config, "git_commit": commit})  # fmt: skip

    def log(self, step: int, metrics: dict, buf=None, images=None) -> None:
        """Every number of the step's ``metrics`` under its tag; a sample table on every
        ``samples_every``-th step (``buf``: the step's ``grpo.rollout.RolloutBuffer``, ``images``:
        the PIL images of its prompts)."""
        scalars = {
            tag(k): float(v) for k, v in metrics.items() if k != "step" and isinstance(v, (int, float))
        }
        if self.tb is not None:
            for name, value in scalars.items():
                self.tb.add_scalar(name, value, step)
        table = buf is not None and self.samples_every and step % self.samples_every == 0
        rows = sample_rows(buf, images, self.n_samples) if table and (self.tb or self.wandb) else []
        if self.tb is not None and rows:
            self.tb.add_text("samples", markdown_table(rows), step)
            thumbs = [np.asarray(im.convert("RGB")) for r in rows for im in r["images"]]
            for i, t in enumerate(thumbs):
                self.tb.add_image(f"samples/image_{i + 1}", t, step, dataformats="HWC")
        if self.wandb is not None:
            import wandb

            if rows:
                k = max(len(r["images"]) for r in rows)
                columns = [
                    "step",
                    "prompt",
                    *(f"image_{j + 1}" for j in range(k)),
                    "completion",
                    "reward",
                    "advantage",
                ]
                data = [[step, r["prompt"], *(wandb.Image(im) for im in r["images"]), *[None] * (k - len(r["images"])),
                         r["completion"], r["reward"], r["advantage"]] for r in rows]  # fmt: skip
                scalars["samples"] = wandb.Table(columns=columns, data=data)
            self.wandb.log(scalars, step=step)

    def close(self) -> None:
        if self.tb is not None:
            self.tb.close()
        if self.wandb is not None:
            import wandb

            self.wandb.finish()
            wandb.teardown()  # waits for wandb's service to write the run out: the files are complete on return


def sample_rows(buf, images, n: int) -> list[dict]:
    """The first ``n`` completions of the buffer: prompt, thumbnails of its images, completion, reward, advantage."""
    prompt_rows_N = buf.prompt_rows_N.tolist()
    rows = []
    for i in range(min(n, buf.num_completions)):
        p = prompt_rows_N[i]
        thumbs = []
        for im in images[p] if images is not None else []:
            im = im.copy()
            im.thumbnail((THUMBNAIL, THUMBNAIL))
            thumbs.append(im)
        rows.append({"prompt": buf.samples[p].prompt, "images": thumbs, "completion": buf.texts[i],
                     "reward": float(buf.rewards_N[i]), "advantage": float(buf.advantages_N[i])})  # fmt: skip
    return rows


def markdown_table(rows: list[dict]) -> str:
    """The sample rows as a markdown table (TensorBoard's text plugin renders markdown)."""

    def cell(text: str) -> str:
        return text.replace("|", "\\|").replace("\n", " ")

    lines = ["| prompt | completion | reward | advantage |", "|---|---|---|---|"]
    lines += [f"| {cell(r['prompt'])} | {cell(r['completion'])} | {r['reward']:.3f} | {r['advantage']:+.3f} |"
              for r in rows]  # fmt: skip
    return "\n".join(lines)
