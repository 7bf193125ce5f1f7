"""The measurements of ``experiments/bench.py``, one per worker process (``bench.py --worker KIND``).

Each worker builds its side of the workload, times it and prints one ``BENCH_RESULT {json}`` line:
``ours`` (our ``grpo_step``), ``trl`` (TRL's ``GRPOTrainer`` on the same work), ``groups`` (our
step for each G, prefix sharing on and off), ``lm_head`` (the LM head on completion positions
only vs every position) and ``eval`` (evaluation throughput). Every completion is exactly
``max_new_tokens`` long on both sides (``min_new_tokens``), so both trainers do the same work
whatever the random model samples.
"""

from __future__ import annotations

import resource
import statistics
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
# workload → (YAML, model folder and data folder under --out)
WORKLOADS = {
    "small": (ROOT / "experiments" / "bench.yaml", "model", "hpdv2"),
    "real": (ROOT / "experiments" / "bench-real.yaml", "like-model", "hpdv2-448"),
}
REAL_QWEN_FILES = ROOT.parent / "shared" / "fixtures" / "qwen2.5-vl-7b-instruct"
RESULT_TAG = "BENCH_RESULT "


def rss_mb() -> float:
    """Resident memory now (VmRSS), MiB."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    raise RuntimeError("no VmRSS in /proc/self/status")


def peak_rss_mb() -> float:
    """Peak resident memory of this process so far (ru_maxrss, KiB on Linux), MiB."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def median(xs: list[float]) -> float:
    return float(statistics.median(xs))


def workload_config(out: Path, workload: str = "small", **overrides):
    """The workload's YAML pointed at the model and data under ``out``, with overrides."""
    from common.config import load_config

    yaml, model_dir, data_dir = WORKLOADS[workload]
    items = [f"model.name_or_path={out / model_dir}", f"data.root={out / data_dir}"]
    items += [f"{k}={v}" for k, v in overrides.items()]
    return load_config(yaml, items)


class ForwardCounter:
    """Counts calls of a module (every forward: generate's decode steps, log-prob passes)."""

    def __init__(self, module):
        self.n = 0
        if module is not None:
            module.register_forward_pre_hook(self._hook)

    def _hook(self, *_):
        self.n += 1


def train_samples(cfg, n: int):
    from data.hpdv2 import read_train

    samples = read_train(cfg.data.root, fraction=1.0, seed=0).samples
    assert len(samples) >= n, f"the benchmark data holds {len(samples)} pairs, {n} needed"
    return samples[:n]


def worker_ours(a) -> dict:
    """Our ``grpo_step`` on the workload: per-step times, phases, forward counts, memory."""
    import torch

    from grpo.policy import build_policy
    from grpo.train import grpo_step

    cfg = workload_config(
        a.out, a.workload, **{"train.bf16": a.precision == "bf16", "grpo.share_prefix": a.share_prefix}
    )
    device = torch.device("cpu")
    torch.manual_seed(cfg.train.seed)
    policy, reference, processor = build_policy(cfg, device)
    params = [p for p in policy.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=cfg.train.lr, weight_decay=cfg.train.weight_decay)
    B, n_steps = cfg.grpo.prompts_per_step, a.warmup + a.steps
    samples = train_samples(cfg, B * n_steps)
    policy_calls, reference_calls = ForwardCounter(policy), ForwardCounter(reference)
    setup_rss = rss_mb()
    times, cpu, phases, lengths, calls = [], [], [], [], []
    for i in range(n_steps):
        batch = samples[B * i : B * (i + 1)]
        images = [[ref.load() for ref in s.images] for s in batch]  # decoded outside the timed step
        n0, r0 = policy_calls.n, reference_calls.n
        t0, c0 = time.perf_counter(), time.process_time()
        _, metrics = grpo_step(policy, policy, reference, processor, optimizer, batch, images, None, cfg, device,
                               min_new_tokens=cfg.grpo.max_new_tokens)  # fmt: skip
        dt, dc = time.perf_counter() - t0, time.process_time() - c0
        if i >= a.warmup:
            times.append(dt)
            cpu.append(dc)
            phases.append({k[5:]: v for k, v in metrics.items() if k.startswith("time/")})
            lengths.append(metrics["completion_len_mean"])
            calls.append({"policy": policy_calls.n - n0, "reference": reference_calls.n - r0})
    return {
        "step_s": times,
        "step_cpu_s": cpu,
        "phases_s": {k: median([p[k] for p in phases]) for k in phases[0]},
        "completion_len_mean": lengths,
        "forward_calls_per_step": calls[-1],
        "setup_rss_mb": setup_rss,
        "peak_rss_mb": peak_rss_mb(),
    }


def worker_trl(a) -> dict:
    """TRL's ``GRPOTrainer`` on the same workload, timed per optimizer step by a callback."""
    import torch
    from datasets import Dataset
    from transformers import TrainerCallback
    from trl import GRPOConfig, GRPOTrainer

    from data.prompts import messages_for
    from grpo.rewards import compute_rewards
    from models.qwen_vl import load_policy, set_pixel_bounds, vision_token_ids

    cfg = workload_config(a.out, a.workload)
    g, t = cfg.grpo, cfg.train
    B, n_steps = g.prompts_per_step, a.warmup + a.steps
    samples = train_samples(cfg, B * n_steps)
    dataset = Dataset.from_dict({
        "prompt": [messages_for(s.task, s.prompt, len(s.images)) for s in samples],
        "images": [[ref.load() for ref in s.images] for s in samples],
        "target": [s.target for s in samples],
    })  # fmt: skip

    def reward(completions, target, **_):
        """The same rewards as ours (format + exact match)."""
        texts = [c[-1]["content"] if isinstance(c, list) else c for c in completions]
        return compute_rewards(texts, target, "pair", (0, 1), g.reward_weights)[0].tolist()

    class Timer(TrainerCallback):
        def __init__(self):
            self.times, self.cpu, self.lengths, self.calls, self.t0, self.c0 = [], [], [], [], 0.0, 0.0

        def on_step_begin(self, args, state, control, **kw):
            self.n0, self.r0 = policy_calls.n, reference_calls.n
            self.t0, self.c0 = time.perf_counter(), time.process_time()

        def on_step_end(self, args, state, control, **kw):
            self.times.append(time.perf_counter() - self.t0)
            self.cpu.append(time.process_time() - self.c0)
            self.calls.append({"policy": policy_calls.n - self.n0, "reference": reference_calls.n - self.r0})

        def on_log(self, args, state, control, logs=None, **kw):
            if logs and "completions/mean_length" in logs:
                self.lengths.append(float(logs["completions/mean_length"]))

    torch.manual_seed(t.seed)
    model, processor = load_policy(cfg.model.name_or_path, dtype=cfg.model.dtype)
    set_pixel_bounds(processor, cfg.model.min_pixels, cfg.model.max_pixels)  # as our build_policy does
    args = GRPOConfig(
        output_dir=str(a.out / "trl-run"), report_to=[], save_strategy="no", disable_tqdm=True, logging_steps=1,
        use_cpu=True, bf16=a.precision == "bf16", seed=t.seed, shuffle_dataset=False, dataloader_num_workers=0,
        per_device_train_batch_size=B * g.group_size, gradient_accumulation_steps=1, num_generations=g.group_size,
        max_completion_length=g.max_new_tokens, temperature=g.temperature, top_k=0, top_p=1.0,
        generation_kwargs={"min_new_tokens": g.max_new_tokens, "suppress_tokens": vision_token_ids(model)},
        beta=g.kl_coef, num_iterations=g.ppo_epochs, epsilon=g.clip_eps, loss_type="grpo", scale_rewards="group",
        learning_rate=t.lr, lr_scheduler_type="constant", weight_decay=t.weight_decay, max_grad_norm=t.max_grad_norm,
        gradient_checkpointing=cfg.model.gradient_checkpointing, max_steps=n_steps,
    )  # fmt: skip
    timer = Timer()
    trainer = GRPOTrainer(model=model, reward_funcs=[reward], args=args, train_dataset=dataset,
                          processing_class=processor, callbacks=[timer])  # fmt: skip
    policy_calls, reference_calls = ForwardCounter(trainer.model), ForwardCounter(trainer.ref_model)
    setup_rss = rss_mb()
    trainer.train()
    assert len(timer.times) == n_steps, f"TRL ran {len(timer.times)} steps, expected {n_steps}"
    return {
        "step_s": timer.times[a.warmup :],
        "step_cpu_s": timer.cpu[a.warmup :],
        "completion_len_mean": timer.lengths[a.warmup :],
        "forward_calls_per_step": timer.calls[-1],
        "setup_rss_mb": setup_rss,
        "peak_rss_mb": peak_rss_mb(),
    }


def worker_groups(a) -> dict:
    """Our step for each G, prefix sharing on and off (alternating), and the prompt prefill alone."""
    import torch

    from grpo.policy import build_policy
    from grpo.rollout import encode_samples
    from grpo.train import grpo_step
    from models.kv_cache import prefill_shared
    from models.qwen_vl import group_rows, repeat_inputs

    cfg = workload_config(a.out, a.workload)
    device = torch.device("cpu")
    torch.manual_seed(cfg.train.seed)
    policy, reference, processor = build_policy(cfg, device)
    optimizer = torch.optim.AdamW([p for p in policy.parameters() if p.requires_grad], lr=cfg.train.lr)
    B, n_steps = cfg.grpo.prompts_per_step, a.warmup + a.steps
    samples = train_samples(cfg, B * n_steps)
    batches = [samples[B * i : B * (i + 1)] for i in range(n_steps)]
    images = [[[ref.load() for ref in s.images] for s in batch] for batch in batches]
    out = {}
    for j, G in enumerate(a.group_sizes):
        for share in (True, False) if j % 2 == 0 else (False, True):  # alternate which mode goes first
            c = workload_config(a.out, a.workload, **{"grpo.group_size": G, "grpo.minibatch_size": B * G,
                                                      "grpo.share_prefix": share})  # fmt: skip
            times, phases = [], []
            for i in range(n_steps):
                t0 = time.perf_counter()
                _, m = grpo_step(policy, policy, reference, processor, optimizer, batches[i], images[i], None, c,
                                 device, min_new_tokens=c.grpo.max_new_tokens)  # fmt: skip
                if i >= a.warmup:
                    times.append(time.perf_counter() - t0)
                    phases.append({k[5:]: v for k, v in m.items() if k.startswith("time/")})
            # The prompt part alone: the prefill of the B prompts (with their images) for G samples each.
            inputs = encode_samples(processor, batches[0], images[0], None)
            rows = group_rows(B, G)
            prefill = []
            policy.eval()
            with torch.no_grad():
                for _ in range(5):
                    t0 = time.perf_counter()
                    if share:
                        prefill_shared(policy, inputs, rows)
                    else:
                        policy(**repeat_inputs(inputs, G), use_cache=True, logits_to_keep=1)
                    prefill.append(time.perf_counter() - t0)
            out[f"G={G},share_prefix={share}"] = {
                "G": G, "share_prefix": share, "step_s": median(times),
                "phases_s": {k: median([p[k] for p in phases]) for k in phases[0]},
                "prefill_s": median(prefill), "completions_per_s": B * G / median(times),
            }  # fmt: skip
    return out


def worker_lm_head(a) -> dict:
    """The log-prob forward+backward with the LM head on the T completion positions only
    (``logits_to_keep``, as ``completion_logprobs`` does) vs on all L+T positions."""
    import torch

    from grpo.policy import build_policy
    from grpo.rollout import encode_samples
    from models.logprobs import selective_log_softmax
    from models.qwen_vl import repeat_inputs

    cfg = workload_config(a.out)
    torch.manual_seed(0)
    policy, _, processor = build_policy(cfg, torch.device("cpu"))
    policy.train()
    G, T = cfg.grpo.group_size, cfg.grpo.max_new_tokens
    batch = train_samples(cfg, cfg.grpo.prompts_per_step)
    inputs = repeat_inputs(
        encode_samples(processor, batch, [[r.load() for r in s.images] for s in batch], None), G
    )
    ids = torch.randint(0, 800, (inputs["input_ids"].shape[0], T))
    full_ids = torch.cat([inputs["input_ids"], ids], dim=1)
    mask = torch.cat([inputs["attention_mask"], torch.ones_like(ids)], dim=1)
    mm = torch.cat([inputs["mm_token_type_ids"], torch.zeros_like(ids)], dim=1)
    runs = {"completion_positions": [], "all_positions": []}
    for _ in range(5):  # alternating, medians
        for name, keep in (("completion_positions", T + 1), ("all_positions", 0)):
            t0 = time.perf_counter()
            logits = policy(
                input_ids=full_ids,
                attention_mask=mask,
                mm_token_type_ids=mm,
                logits_to_keep=keep,
                pixel_values=inputs["pixel_values"],
                image_grid_thw=inputs["image_grid_thw"],
            ).logits
            logp = selective_log_softmax(logits[:, -T - 1 : -1].float(), ids)
            logp.sum().backward()
            policy.zero_grad(set_to_none=True)
            runs[name].append(
                (time.perf_counter() - t0, list(logits.shape), logits.numel() * logits.element_size())
            )
    out = {
        name: {
            "fwd_bwd_s": median([r[0] for r in rs]),
            "logits_shape": rs[0][1],
            "logits_mb": rs[0][2] / 2**20,
        }
        for name, rs in runs.items()
    }
    return out


def worker_eval(a) -> dict:
    """Evaluation throughput (images/s): soft rating (ImageRewardDB layout) and anchor ranking of N = 9."""
    import torch

    from common.config import EvalConfig
    from data.hpdv2 import read_eval as read_hpdv2_eval
    from data.imagereward import read_eval as read_ir_eval
    from data.imagereward import read_train as read_ir_train
    from eval.evaluate import evaluate
    from models.qwen_vl import load_policy

    cfg = workload_config(a.out)
    model, processor = load_policy(cfg.model.name_or_path)
    T = cfg.grpo.max_new_tokens
    scale = read_ir_train(a.out / "imagereward").rating_values
    jobs = {
        "soft_rating": (
            "imagereward",
            read_ir_eval(a.out / "imagereward", split="test").groups,
            "rating",
            scale,
        ),
        "anchor_ranking_n9": ("hpdv2", read_hpdv2_eval(a.out / "hpdv2").groups, "anchor", None),
    }
    out = {}
    for name, (kind, groups, method, values) in jobs.items():
        groups = groups[: a.eval_groups]
        ecfg = EvalConfig(method=method, k=1, batch_size=16, seed=0)
        torch.manual_seed(0)
        evaluate(model, processor, groups[:1], kind, values, ecfg, T, progress=False)  # warm-up
        t0 = time.perf_counter()
        report = evaluate(model, processor, groups, kind, values, ecfg, T, progress=False)
        wall = time.perf_counter() - t0
        out[name] = {"images": report["n_images"], "requests": report["n_requests"], "wall_s": wall,
                     "images_per_s": report["n_images"] / wall, "max_new_tokens": T, "batch_size": 16}  # fmt: skip
    return out


WORKERS = {"ours": worker_ours, "trl": worker_trl, "groups": worker_groups, "lm_head": worker_lm_head,
           "eval": worker_eval}  # fmt: skip
