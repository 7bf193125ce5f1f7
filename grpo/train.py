"""GRPO training of a Qwen2.5-VL preference judge: ``python -m grpo.train CONFIG.yaml [key=value ...]``.

One step, in the order of the paper (arXiv 2503.19948, after DeepSeekMath's GRPO):

1. sample B prompts and G completions for each (``grpo.share_prefix``, the default: each prompt is
   prefilled once and our own sampling loop continues it G times; off: one batched ``generate``);
2. score every completion with the task's rewards (format + exact [+ approximate]);
3. normalise rewards within each group: A_i = (r_i − mean) / (std + 1e-4);
4. compute log π_ref (β > 0) and log π_θold (μ > 1) without gradients;
5. run μ passes of the clipped objective with a KL penalty (``grpo.loss``), one AdamW step each;
6. log, evaluate, checkpoint.

Under ``torchrun`` every rank samples whole groups of its own prompts (so advantages stay
local) and the gradients are averaged across ranks: DDP keeps a full copy of everything on every
rank, FSDP2 shards weights, gradients, optimizer state and reference (``train.strategy``,
``grpo.run.distributed``). ``grpo.memory``'s plan of the run is printed before the model is loaded.

This file holds the step and the loop; the machinery of a run (the sample stream, checkpoints,
ranks, the memory plan) is in ``grpo.run``, and the held-out evaluation (``grpo.heldout``) calls
down into the scoring layer, ``eval.evaluate.evaluate``. The objective's variants (Dr. GRPO,
DAPO, GSPO, batch-scaled advantages; ``grpo.loss_type`` and its neighbours) are functions of
``grpo.loss`` and ``grpo.advantages``; dynamic sampling is ``grpo.dynamic_sampling``.

Deviations from the paper, on purpose: the KL term uses the k3 estimator by default
(``grpo.loss``); the group std is the unbiased one (``grpo.advantages``). Minibatches are
weighted so that every aggregation is the batch's own (``token-mean`` by tokens, the others by
completions); under ``torchrun`` each rank aggregates its own batch and the gradients are averaged.
"""

from __future__ import annotations

import argparse
import math
import os
import sys
from collections import Counter, defaultdict
from contextlib import nullcontext
from functools import partial
from pathlib import Path

import torch
import torch.distributed as dist
from tqdm import tqdm

from common.config import Config, load_config, save_config
from common.errors import user_errors_exit
from common.manifest import check_model_source, check_same_task, load_errors_as_checkpoint_error, task_record
from data.prompts import answer_values
from data.read import read_train_set
from grpo.advantages import ADVANTAGE_SCALINGS, group_stats
from grpo.dynamic_sampling import sample_with_spread
from grpo.heldout import heldout_groups, run_eval
from grpo.loss import grpo_loss
from grpo.policy import build_policy, reference_logprobs
from grpo.rewards import compute_rewards
from grpo.rollout import RolloutBuffer, buffer_logprobs, encode_samples
from grpo.run.checkpoint import check_writable, log_step, resolve_resume, save_checkpoint, trim_logs
from grpo.run.distributed import (
    all_ranks_learn,
    average_across_ranks,
    check_supported,
    clip_grad_norm,
    compute_in_bf16,
    gather_rank_states,
    gathered,
    is_sharded,
    leave_distributed,
    lost_rank_is_one_line,
    prepare,
    setup_distributed,
    stop_on_sigterm,
)
from grpo.run.memory_plan import print_memory_plan
from grpo.run.resume import plan_resume, restore
from grpo.run.sharded_checkpoint import save_sharded_checkpoint
from grpo.run.stream import SampleStream, check_data_folder, drop_prompts_too_long, next_batch
from grpo.run.tracking import Tracker, peak_memory, timed
from models.logprobs import completion_logprobs
from models.sampling import sample_completions
from models.soft_head import answer_positions

# ------------------------------------------------------------------------------------ helpers


def lr_at(step: int, peak: float, warmup: int, total: int, schedule: str) -> float:
    """Linear warm-up to ``peak`` over ``warmup`` steps, then constant / cosine (to 10%) / linear (to 0)."""
    if step < warmup:
        return peak * (step + 1) / warmup
    progress = (step - warmup) / max(1, total - warmup)
    if schedule == "cosine":
        return peak * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * progress)))
    if schedule == "linear":
        return peak * max(0.0, 1 - progress)
    return peak


def to_device(batch: dict, device) -> dict:
    return {k: v.to(device) for k, v in batch.items()}


def autocast(cfg: Config, device: torch.device):
    """bfloat16 compute over float32 master weights (``grpo.policy``): ``model.dtype=bfloat16`` or
    ``train.bf16``. Under FSDP the all-gather casts to bf16 instead (``grpo.run.distributed``)."""
    on = compute_in_bf16(cfg) and not (cfg.train.strategy == "fsdp" and dist.is_initialized())
    return torch.autocast(device.type, dtype=torch.bfloat16) if on else nullcontext()


# ------------------------------------------------------------------------------ the GRPO step


def grpo_step(
    policy, train_model, reference, processor, optimizer, samples, images, rating_values, cfg, device,
    min_new_tokens: int = 0, draw=None,
):  # fmt: skip
    """One GRPO step on B samples; returns the filled rollout buffer and the step's metrics.

    ``min_new_tokens`` > 0 holds back every completion's end (the benchmark's fixed lengths).
    ``draw(k)``: k fresh (samples, images), for dynamic sampling's extra rounds.
    """
    g, s = cfg.grpo, cfg.grpo.sampling
    B, G = len(samples), g.group_size
    valid = answer_values(samples[0].task, rating_values or ())
    t = {}

    # 1.–2. B prompts × G completions with their rewards; dynamic sampling (DAPO, off by default)
    # replaces the groups whose rewards all agree with groups of fresh prompts, within a budget.
    buf = rollout(policy, processor, samples, images, rating_values, cfg, device, t, min_new_tokens)
    sampled_BG, refill = buf.rewards_N.view(B, G), {}
    if g.dynamic_sampling:
        more = partial(rollout, policy, processor, rating_values=rating_values, cfg=cfg, device=device, t=t,
                       min_new_tokens=min_new_tokens)  # fmt: skip
        buf, sampled_BG, refill = sample_with_spread(buf, more, draw, g.dynamic_sampling_max_rounds,
                                                     processor.tokenizer.pad_token_id)  # fmt: skip

    # 3. Group-normalised advantages (grpo.scale_rewards: the group's std, the batch's, or none).
    with timed(t, "score"):
        rewards_BG = buf.rewards_N.view(B, G)
        buf.advantages_N = ADVANTAGE_SCALINGS[g.reward_scaling](rewards_BG).flatten().to(device)  # (N,)
        buf.answer_pos_N = answer_positions(processor.tokenizer, buf.ids_NT, buf.mask_NT, buf.texts, valid)

    # 4. Log-probs without gradients: the frozen reference (β > 0) and the sampling policy (μ > 1).
    with timed(t, "reference"), autocast(cfg, device):
        if g.kl_coef > 0:
            buf.ref_logp_NT = reference_logprobs(policy, reference, buf, g.minibatch_size, s.temperature)
        if g.ppo_epochs > 1:
            buf.old_logp_NT = buffer_logprobs(policy, buf, g.minibatch_size, s.temperature)

    # 5. μ passes of the clipped objective, one optimizer step each.
    with timed(t, "update"):
        policy.train()
        for _ in range(g.ppo_epochs):
            stats = update_pass(train_model, optimizer, buf, cfg, device)

    lengths = buf.mask_NT.sum(dim=1).float()
    metrics = {
        **group_stats(sampled_BG),  # every group sampled this step (dynamic sampling: all rounds)
        **refill,
        **{f"reward/{k}": float(v.mean()) for k, v in buf.components.items()},
        **stats,
        "adv_std": float(buf.advantages_N.std()),
        "adv_abs_max": float(buf.advantages_N.abs().max()),
        "completion_len_mean": float(lengths.mean()),
        "completion_len_min": float(lengths.min()),
        "completion_len_max": float(lengths.max()),
        "frac_truncated": float(buf.truncated_N.float().mean()),
        **{f"time/{k}": v for k, v in t.items()},
        "tokens_per_s": float(lengths.sum()) / max(sum(t.values()), 1e-9),
    }
    return buf, metrics


def rollout(policy, processor, samples, images, rating_values, cfg, device, t: dict, min_new_tokens: int = 0):
    """Steps 1–2 of the GRPO step: G completions for each sample, rewarded; a ``RolloutBuffer``."""
    g, s, task = cfg.grpo, cfg.grpo.sampling, samples[0].task
    # 1. Sample B prompts × G completions (each prompt prefilled once with share_prefix).
    with timed(t, "generate"), autocast(cfg, device):
        inputs = to_device(encode_samples(processor, samples, images, rating_values), device)
        policy.eval()
        with gathered(policy):  # FSDP: the whole policy once per rollout, not once per token
            comp = sample_completions(policy, processor, inputs, g.group_size, s.max_new_tokens, s.temperature,
                                      min_new_tokens=min_new_tokens, share_prefix=s.share_prefix)  # fmt: skip
    buf = RolloutBuffer(inputs, g.group_size, comp.ids_NT, comp.mask_NT, comp.texts, comp.truncated_N, samples,
                        share_prefix=s.share_prefix)  # fmt: skip

    # 2. Rewards of every completion.
    with timed(t, "score"):
        valid = answer_values(task, rating_values or ())
        buf.rewards_N, buf.components = compute_rewards(
            buf.texts, buf.targets_N(), task, valid, g.reward_weights
        )
    return buf


def update_pass(model, optimizer, buf: RolloutBuffer, cfg: Config, device) -> dict:
    """One pass of the clipped GRPO objective over the buffer: accumulate, clip, step."""
    g = cfg.grpo
    optimizer.zero_grad(set_to_none=True)
    minibatches = list(buf.minibatches(g.minibatch_size))
    sums, lo, hi, n_tokens = defaultdict(float), math.inf, -math.inf, 0
    answer_nll = []  # −log π of each sampled answer token: their mean estimates the answer's entropy
    for i, mb in enumerate(minibatches):
        last = i == len(minibatches) - 1
        sync = model.no_sync() if hasattr(model, "no_sync") and not last else nullcontext()
        # each minibatch's share of the batch: of its completions, or of its tokens for token-mean
        weight = len(mb.rows) / buf.num_completions
        if g.aggregation == "token-mean":
            weight = float(mb.mask_NT.sum()) / max(float(buf.mask_NT.sum()), 1.0)
        with sync, autocast(cfg, device):
            logp_NT = completion_logprobs(
                model, mb.inputs, mb.ids_NT, mb.mask_NT, g.sampling.temperature, mb.prompt_rows
            )
            loss, stats = grpo_loss(logp_NT, mb.old_logp_NT, mb.ref_logp_NT, mb.advantages_N, mb.mask_NT,
                                    g.clip_range[0], g.kl_coef, g.kl_estimator, g.aggregation, g.clip_range[1],
                                    g.importance_sampling_level, g.max_new_tokens)  # fmt: skip
            (loss * weight).backward()
        answer_nll.append(-buf.answer_logprobs(mb.rows, logp_NT.detach()))
        sums["entropy"] -= float(logp_NT.detach().sum())  # 0 on padding; / n_tokens below
        n_tokens += int(mb.mask_NT.sum())
        for key in ("loss", "kl", "clip_frac", "clip_frac_low", "clip_frac_high", "ratio_mean"):
            sums[key] += stats[key] * weight
        lo, hi = min(lo, stats["ratio_min"]), max(hi, stats["ratio_max"])
    params = [p for p in model.parameters() if p.requires_grad]
    grad_norm = clip_grad_norm(params, cfg.train.max_grad_norm)
    optimizer.step()
    answer_nll = torch.cat(answer_nll)
    answer = {"answer_entropy": float(answer_nll.mean())} if answer_nll.numel() else {}
    sums["entropy"] /= max(n_tokens, 1)  # mean −log π of the sampled tokens: an estimate of the entropy
    return {**sums, "ratio_min": lo, "ratio_max": hi, "grad_norm": grad_norm, **answer}


# ----------------------------------------------------------------------------------- the loop


def train(cfg: Config) -> Path:
    """Run GRPO as configured; return the folder of the final checkpoint."""
    rank, world, device = setup_distributed(cfg.train.device)
    if world > 1:
        stop_on_sigterm()  # a rank told to stop ends with rank 0's one line
    check_supported(cfg, world)
    out = Path(cfg.train.output_dir)
    with all_ranks_learn(world):  # a read-only output folder is one line before any model loads
        if rank == 0:
            check_writable(out)
    train_set = read_train_set(cfg)
    eval_groups = heldout_groups(cfg) if cfg.eval.every else []
    ckpt = resolve_resume(cfg.train.resume, out, say=rank == 0)
    check_same_task(ckpt, train_set)
    check_model_source(cfg.model.name_or_path)
    plan = print_memory_plan(cfg, world, device, show=rank == 0)  # before any weight reaches the device
    resume = plan_resume(ckpt, cfg, world, plan)  # any strategy and number of processes (grpo.run.resume)

    torch.manual_seed(cfg.train.seed)  # identical LoRA init on every rank (DDP also broadcasts it)
    with load_errors_as_checkpoint_error(str(ckpt or cfg.model.name_or_path)):
        policy, reference, processor = build_policy(cfg, device, resume_from=resume and resume.weights)
    drop_prompts_too_long(train_set, eval_groups, processor.tokenizer, cfg.data.max_prompt_tokens)
    policy, reference, train_model = prepare(cfg, policy, reference, world, device)  # DDP or FSDP
    params = [p for p in policy.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=cfg.train.lr, weight_decay=cfg.train.weight_decay)

    start, order = 0, {}
    torch.manual_seed(cfg.train.seed + rank)  # each rank samples its own completions
    if resume is not None:  # the optimizer, this rank's RNG streams and the data order
        start, order = restore(resume, policy, optimizer, rank, world, cfg.grpo.prompts_per_step)
    stream = SampleStream(len(train_set.samples), cfg.train.seed, rank, world, **order)

    with all_ranks_learn(world):  # rank 0 writes; if that fails (a read-only folder), every rank stops
        if rank == 0:
            if cfg.train.resume:  # also with no checkpoint yet: a crash before the first save
                trim_logs(out, start)
            out.mkdir(parents=True, exist_ok=True)
            save_config(cfg, out / "config.yaml")
            print(f"training on {len(train_set.samples)} samples ({cfg.data.kind}, skipped {dict(train_set.skipped)}), "
                  f"{world} process(es), device {device}, from step {start}", file=sys.stderr)  # fmt: skip
    tracker = Tracker(cfg, out, start, enabled=rank == 0)  # train.report_to: TensorBoard, wandb
    skipped = Counter()
    bar = tqdm(
        range(start, cfg.train.steps), initial=start, total=cfg.train.steps, disable=rank != 0, desc="grpo"
    )
    for step in bar:
        lr = lr_at(step, cfg.train.lr, cfg.train.warmup_steps, cfg.train.steps, cfg.train.lr_schedule)
        for group in optimizer.param_groups:
            group["lr"] = lr
        samples, images = next_batch(stream, train_set.samples, cfg.grpo.prompts_per_step, skipped)
        buf, metrics = grpo_step(policy, train_model, reference, processor, optimizer, samples, images,
                                 train_set.rating_values, cfg, device,
                                 draw=lambda k: next_batch(stream, train_set.samples, k, skipped))  # fmt: skip
        metrics = average_across_ranks({**metrics, "skipped_images": skipped["bad image"]}, world)
        metrics = {"step": step + 1, "lr": lr, **metrics, **peak_memory(device)}
        if cfg.eval.every and ((step + 1) % cfg.eval.every == 0 or step + 1 == cfg.train.steps):
            with autocast(cfg, device):
                metrics.update(
                    run_eval(policy, processor, eval_groups, train_set.rating_values, cfg, rank, world)
                )
        with all_ranks_learn(world):
            if rank == 0:
                log_step(out, metrics, buf, cfg.train.log_completions)
                tracker.log(step + 1, metrics, buf, images)
                bar.set_postfix(reward=f"{metrics['reward_mean']:.3f}", kl=f"{metrics['kl']:.4f}",
                                fmt=f"{metrics.get('reward/format', 0):.2f}", len=f"{metrics['completion_len_mean']:.0f}")  # fmt: skip
        last = step + 1 == cfg.train.steps
        if last or (cfg.train.save_every and (step + 1) % cfg.train.save_every == 0):
            rank_states = gather_rank_states(policy, stream, world)
            task = task_record(train_set, cfg.data.rating_field)
            if is_sharded(policy):  # every rank writes its shards; the last one also as a HF folder
                save_sharded_checkpoint(out, step + 1, policy, processor, optimizer, rank_states, cfg,
                                        cfg.train.keep_last, rank, consolidate=last, task=task)  # fmt: skip
            else:  # rank 0 writes the whole model
                with all_ranks_learn(world):
                    if rank == 0:
                        save_checkpoint(out, step + 1, policy, processor, optimizer, rank_states, cfg,
                                        cfg.train.keep_last, cfg.train.save_merged, task)  # fmt: skip
    tracker.close()
    if world > 1:
        dist.barrier()
    return out / f"checkpoint-{cfg.train.steps:06d}"


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], epilog=__doc__.split("\n\n", 1)[1],
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )  # fmt: skip
    parser.add_argument("config", help="experiment YAML, e.g. experiments/imagereward.yaml")
    parser.add_argument(
        "overrides", nargs="*", help="section.key=value, e.g. grpo.group_size=4 train.lr=3e-6"
    )
    args = parser.parse_args(argv)
    with leave_distributed(), user_errors_exit(), lost_rank_is_one_line():
        cfg = load_config(args.config, args.overrides)
        check_data_folder(cfg)
        final = train(cfg)
        if int(os.environ.get("RANK", "0")) == 0:
            print(f"done: {final}")


if __name__ == "__main__":
    main()
