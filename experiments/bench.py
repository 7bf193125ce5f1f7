"""Our GRPO step against TRL's GRPOTrainer on the same workload: ``python experiments/bench.py --out runs/bench``.

``make bench`` runs it (after installing the pinned ``trl==1.16.0`` of the ``bench`` extra). The
workload is ``experiments/bench.yaml``: the "small" tiny Qwen2.5-VL (~6M parameters, random
weights), synthetic HPDv2 pairs (2 images of 200 px = 49 image tokens each, a 238-token prompt),
G = 8 completions for each of 2 prompts per step, exactly 64 new tokens (min_new_tokens =
max_new_tokens), β = 0.04 with a frozen reference copy, μ = 1, every weight trained, no gradient
checkpointing, one forward/backward over the 16 completions, AdamW.

Every measurement runs in its own subprocess (so peak RSS is per side), the two sides alternate
(ours, TRL, TRL, ours, … per precision), each process runs ``--warmup`` steps before ``--steps``
timed ones, and the report gives medians. A step is timed from sampling to the optimizer step
on both sides (our ``grpo_step``; TRL from ``on_step_begin`` to ``on_step_end``); decoding the
images and logging are outside on both sides. Also measured: our step for G ∈ {2, 4, 8, 16}
with and without prefix sharing and the prompt prefill alone, the LM head on completion
positions only vs on every position, and evaluation throughput (soft rating; anchor ranking
with N = 9). Results: ``OUT/bench.json`` and ``OUT/BENCHMARKS.md``; the table also replaces the
generated section of the repository's ``BENCHMARKS.md``.

Allocator: both sides run under ``MALLOC_MMAP_THRESHOLD_=1048576`` by default
(``--malloc-mmap-threshold``, 0 for glibc's own). glibc raises its mmap threshold each time a large
block is freed, up to 32 MiB, so later tensors of up to 32 MiB come from the heap, and the heap
keeps the pages they freed: measured on the real workload, our peak RSS then grows with every step
a process runs (1,665 MiB after one step, 2,224 MiB after three) while the live tensors do not. A
fixed threshold returns every block of 1 MiB and more to the system when it is freed, so peak RSS
measures the memory each trainer uses, not how glibc's heap fragmented. It is the same setting for
both sides; CUDA memory does not go through glibc. It moves the times too: every block of 1 MiB
or more is then a fresh mmap (on the real workload, before our sampling draw and LM-head pass
reused their buffers, our step took 19% longer and TRL's 17% less; since then ours takes about as
long under either setting: BENCHMARKS.md, rows h-j).

Threads: ``--threads 1`` by default, the same for both sides. On a 2-core machine shared with
other jobs, two OpenMP threads stall at every barrier whenever one core is taken (steps then vary
3-5× from one to the next); one thread per process keeps the comparison stable.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import statistics
import subprocess
import sys
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
MARK_BEGIN, MARK_END = "<!-- bench:begin (written by experiments/bench.py) -->", "<!-- bench:end -->"


# ------------------------------------------------------------------------------------ helpers


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


def force_length(cfg) -> None:
    """Make every sampled completion exactly ``max_new_tokens`` long, so both trainers do the same
    work whatever the random model samples. GRPO itself never sets ``min_new_tokens``: only this
    benchmark rebinds the sampler that ``grpo.train`` calls."""
    import functools

    import grpo.train
    from models.sampling import sample_completions

    grpo.train.sample_completions = functools.partial(
        sample_completions, min_new_tokens=cfg.grpo.max_new_tokens
    )


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


# ------------------------------------------------------------------------------------ workers


def worker_ours(a) -> dict:
    """Our ``grpo_step`` on the workload: per-step times, phases, forward counts, memory."""
    import torch

    from grpo.policy import build_policy
    from grpo.train import grpo_step

    cfg = workload_config(
        a.out, a.workload, **{"train.bf16": a.precision == "bf16", "grpo.share_prefix": a.share_prefix}
    )
    force_length(cfg)
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
        _, metrics = grpo_step(
            policy, policy, reference, processor, optimizer, batch, images, None, cfg, device
        )
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
    from models.qwen_vl import repeat_inputs

    cfg = workload_config(a.out, a.workload)
    force_length(cfg)
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
                _, m = grpo_step(
                    policy, policy, reference, processor, optimizer, batches[i], images[i], None, c, device
                )
                if i >= a.warmup:
                    times.append(time.perf_counter() - t0)
                    phases.append({k[5:]: v for k, v in m.items() if k.startswith("time/")})
            # The prompt part alone: the prefill of the B prompts (with their images) for G samples each.
            inputs = encode_samples(processor, batches[0], images[0], None)
            rows = torch.arange(B).repeat_interleave(G)
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


# ------------------------------------------------------------------------------------- parent


def prepare(out: Path, workloads: list[str], like: Path) -> None:
    """The models and synthetic datasets of the workloads (built once, reused): the small tiny
    model with 200-px data; a tiny-sized model of the real configuration (``models.tiny --like``)
    with 448-px pairs."""
    from data.synthetic import write_hpdv2, write_imagereward
    from models.tiny import build_like, build_tiny

    if not (out / "model" / "model.safetensors").exists():
        build_tiny(out / "model", seed=0, preset="small")
    if not (out / "hpdv2" / "synthetic.json").exists():
        write_hpdv2(out / "hpdv2", prompts=32, seed=0, task="colour", size=200)
    if not (out / "imagereward" / "synthetic.json").exists():
        write_imagereward(out / "imagereward", prompts=32, seed=0, task="colour", size=200)
    if "real" in workloads:
        if not (out / "like-model" / "model.safetensors").exists():
            build_like(out / "like-model", like, seed=0)
        if not (out / "hpdv2-448" / "synthetic.json").exists():
            write_hpdv2(out / "hpdv2-448", prompts=32, seed=0, task="colour", size=448)


def run(kind: str, a, **extra) -> dict:
    """One worker in a fresh process; returns its JSON result."""
    cmd = [sys.executable, str(Path(__file__).resolve()), "--worker", kind, "--out", str(a.out),
           "--workload", extra.pop("workload", "small"),
           "--threads", str(a.threads), "--warmup", str(extra.pop("warmup", a.warmup)),
           "--steps", str(extra.pop("steps", a.steps)), "--eval-groups", str(a.eval_groups),
           "--group-sizes", *map(str, a.group_sizes)]  # fmt: skip
    for k, v in extra.items():
        cmd += [f"--{k.replace('_', '-')}", str(v)]
    env = {**os.environ, "OMP_NUM_THREADS": str(a.threads), "MKL_NUM_THREADS": str(a.threads),
           "TOKENIZERS_PARALLELISM": "false", "HF_HUB_OFFLINE": "1", "PYTHONPATH": str(ROOT)}  # fmt: skip
    env.pop("MALLOC_MMAP_THRESHOLD_", None)
    if a.malloc_mmap_threshold:
        env["MALLOC_MMAP_THRESHOLD_"] = str(a.malloc_mmap_threshold)
    t0 = time.perf_counter()
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=ROOT)
    if proc.returncode != 0:
        raise SystemExit(f"bench worker {kind} {extra} failed:\n{proc.stderr[-4000:]}")
    lines = [x for x in proc.stdout.splitlines() if x.startswith(RESULT_TAG)]
    assert lines, f"worker {kind} printed no result:\n{proc.stdout[-2000:]}"
    print(f"  {kind} {extra or ''} done in {time.perf_counter() - t0:.0f} s", file=sys.stderr)
    return json.loads(lines[-1][len(RESULT_TAG) :])


def summarise(runs: list[dict], completions_per_step: int) -> dict:
    steps = [s for r in runs for s in r["step_s"]]
    cpu = [s for r in runs for s in r["step_cpu_s"]]
    out = {
        "median_step_s": median(steps),
        "median_step_cpu_s": median(cpu),
        "step_cpu_s": cpu,
        "completions_per_s": completions_per_step / median(steps),
        "peak_rss_mb": max(r["peak_rss_mb"] for r in runs),
        "setup_rss_mb": max(r["setup_rss_mb"] for r in runs),
        "step_s": steps,
        "completion_len_mean": [x for r in runs for x in r["completion_len_mean"]],
        "forward_calls_per_step": runs[-1]["forward_calls_per_step"],
    }
    if "phases_s" in runs[0]:
        out["phases_s"] = {k: median([r["phases_s"][k] for r in runs]) for k in runs[0]["phases_s"]}
    return out


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], epilog=__doc__.split("\n\n", 1)[1],
                                formatter_class=argparse.RawDescriptionHelpFormatter)  # fmt: skip
    p.add_argument(
        "--out", type=Path, default=ROOT / "runs" / "bench", help="folder for model, data and results"
    )
    p.add_argument("--quick", action="store_true", help="a smoke run: 1 step per side, G ∈ {2}, fp32 only")
    p.add_argument("--threads", type=int, default=1, help="torch threads per process, both sides (default 1)")
    p.add_argument(
        "--malloc-mmap-threshold",
        type=int,
        default=1 << 20,
        metavar="BYTES",
        help="glibc's MALLOC_MMAP_THRESHOLD_ for both sides (default 1 MiB; 0 leaves glibc's dynamic one)",
    )
    p.add_argument("--warmup", type=int, default=1, help="untimed steps at the start of every process")
    p.add_argument("--steps", type=int, default=3, help="timed steps per process")
    p.add_argument("--rounds", type=int, default=2, help="processes per side and precision (alternating)")
    p.add_argument("--precisions", nargs="+", default=["fp32", "bf16"], choices=["fp32", "bf16"])
    p.add_argument(
        "--workloads",
        nargs="+",
        default=["small", "real"],
        choices=sorted(WORKLOADS),
        help="small: the tiny 'small' preset; real: the real 7B configuration shrunk (needs --like)",
    )
    p.add_argument("--real-steps", type=int, default=2, help="timed steps per process, real workload")
    p.add_argument(
        "--real-rounds", type=int, default=2, help="processes per side and precision, real workload"
    )
    p.add_argument(
        "--like",
        type=Path,
        default=REAL_QWEN_FILES,
        help="the real Qwen2.5-VL-7B-Instruct files without weights (default ../shared/fixtures/...)",
    )
    p.add_argument("--group-sizes", nargs="+", type=int, default=[2, 4, 8, 16])
    p.add_argument("--eval-groups", type=int, default=8, help="prompts per evaluation throughput run")
    p.add_argument(
        "--headline-only", action="store_true", help="only ours vs TRL (no G sweep, LM head, eval)"
    )
    p.add_argument("--no-markdown", action="store_true", help="do not update the repository's BENCHMARKS.md")
    p.add_argument("--worker", choices=sorted(WORKERS), help=argparse.SUPPRESS)
    p.add_argument("--precision", default="fp32", help=argparse.SUPPRESS)
    p.add_argument("--share-prefix", default="true", help=argparse.SUPPRESS)
    p.add_argument("--workload", default="small", choices=sorted(WORKLOADS), help=argparse.SUPPRESS)
    a = p.parse_args(argv)
    a.out = a.out.resolve()

    if a.worker:
        import torch

        torch.set_num_threads(a.threads)
        a.share_prefix = a.share_prefix.lower() == "true"
        print(RESULT_TAG + json.dumps(WORKERS[a.worker](a)), flush=True)
        return

    if a.quick:
        a.warmup, a.steps, a.rounds, a.precisions, a.group_sizes, a.eval_groups = 0, 1, 1, ["fp32"], [2], 1
        a.real_steps, a.real_rounds = 1, 1
    if "real" in a.workloads and not (a.like / "config.json").is_file():
        print(f"skipping the real workload: {a.like} has no config.json (pass --like DIR)", file=sys.stderr)
        a.workloads = [w for w in a.workloads if w != "real"]
    a.out.mkdir(parents=True, exist_ok=True)
    prepare(a.out, a.workloads, a.like)
    t_start = time.perf_counter()
    workloads = {}
    for workload in a.workloads:
        cfg = workload_config(a.out, workload)
        per_step = cfg.grpo.prompts_per_step * cfg.grpo.group_size
        rounds = a.rounds if workload == "small" else a.real_rounds
        steps = a.steps if workload == "small" else a.real_steps
        by_precision = {}
        for precision in a.precisions:
            print(
                f"{workload} {precision}: ours and TRL alternating, {rounds} process(es) each",
                file=sys.stderr,
            )
            runs = {"ours": [], "trl": []}
            for r in range(rounds):
                for side in ("ours", "trl") if r % 2 == 0 else ("trl", "ours"):
                    runs[side].append(run(side, a, precision=precision, workload=workload, steps=steps))
            ours, trl = summarise(runs["ours"], per_step), summarise(runs["trl"], per_step)
            by_precision[precision] = {
                "ours": ours, "trl": trl,
                "speedup": ours["completions_per_s"] / trl["completions_per_s"],
                "speedup_cpu_time": trl["median_step_cpu_s"] / ours["median_step_cpu_s"],
                "peak_rss_ratio": ours["peak_rss_mb"] / trl["peak_rss_mb"],
            }  # fmt: skip
        workloads[workload] = {"workload": workload_summary(cfg, workload), "protocol": {
            "warmup_steps_per_process": a.warmup, "timed_steps_per_process": steps,
            "processes_per_side_and_precision": rounds}, **by_precision}  # fmt: skip
    cfg = workload_config(a.out)
    by_precision = {k: v for k, v in workloads.get("small", {}).items() if k in ("fp32", "bf16")}
    groups = lm_head = evaluation = None
    sharing_real = None
    if not a.headline_only and "real" in a.workloads:
        print("real workload, checkpointing on: prefix sharing on/off", file=sys.stderr)
        sharing_real = run("groups", a, workload="real", group_sizes=8, warmup=0 if a.quick else 1,
                           steps=1 if a.quick else a.real_steps)  # fmt: skip
    if not a.headline_only and "small" in a.workloads:
        print("group sizes, prefix sharing on/off", file=sys.stderr)
        groups = run("groups", a, warmup=1 if not a.quick else 0, steps=2 if not a.quick else 1)
        lm_head = run("lm_head", a)
        print("evaluation throughput", file=sys.stderr)
        evaluation = run("eval", a)
    head = by_precision.get(a.precisions[0], {})
    result = {
        "precision": a.precisions[0],
        "ours": head.get("ours"),
        "trl": head.get("trl"),
        "speedup": head.get("speedup"),
        "peak_rss_ratio": head.get("peak_rss_ratio"),
        "by_precision": by_precision,
        "workloads": workloads,
        "sharing_real": sharing_real,
        "group_sizes": groups,
        "lm_head": lm_head,
        "eval": evaluation,
        "workload": workload_summary(cfg, "small"),
        "machine": machine_summary(a.threads),
        "protocol": {
            "warmup_steps_per_process": a.warmup,
            "timed_steps_per_process": a.steps,
            "processes_per_side_and_precision": a.rounds,
            "malloc_mmap_threshold": a.malloc_mmap_threshold or "glibc default (dynamic)",
            "quick": a.quick,
        },  # fmt: skip
        "command": command_line(a),
        "wall_s": time.perf_counter() - t_start,
    }
    (a.out / "bench.json").write_text(json.dumps(result, indent=2) + "\n")
    table = markdown(result)
    (a.out / "BENCHMARKS.md").write_text(table)
    if not (a.no_markdown or a.quick or a.headline_only):
        update_benchmarks_md(ROOT / "BENCHMARKS.md", table)
    print(table)


# ------------------------------------------------------------------------------------ reports


WORKLOAD_TEXT = {
    "small": ("tiny preset 'small' (text 256×4, vision 128×4, ~6M parameters, vocabulary 896, random weights)",
              "synthetic HPDv2 pairs, 200×200 px (49 image tokens per image), prompt 238 tokens"),
    "real": ("the real Qwen2.5-VL-7B-Instruct configuration shrunk to text 128×2, vision 64×2 (`models.tiny --like`; "
             "39.7M parameters, 39M of them the embedding and the LM head of the real vocabulary 152,064; real "
             "tokenizer, chat template and processor; random weights)",
             "synthetic HPDv2 pairs, 448×448 px (256 image tokens per image), prompt 628 tokens"),
}  # fmt: skip


def workload_summary(cfg, workload: str) -> dict:
    g = cfg.grpo
    model, data = WORKLOAD_TEXT[workload]
    return {"model": model, "data": data,
            "G": g.group_size, "prompts_per_step": g.prompts_per_step,
            "completions_per_step": g.prompts_per_step * g.group_size, "new_tokens": g.max_new_tokens,
            "beta": g.kl_coef, "mu": g.ppo_epochs, "epsilon": g.clip_eps, "lr": cfg.train.lr,
            "trainable": "all weights, vision tower included; frozen reference copy",
            "gradient_checkpointing": cfg.model.gradient_checkpointing}  # fmt: skip


def machine_summary(threads: int) -> dict:
    import torch
    import transformers
    import trl

    cpuinfo = Path("/proc/cpuinfo")
    flags = set(cpuinfo.read_text().split()) if cpuinfo.exists() else set()
    return {"cpu": platform.processor() or platform.machine(), "cores": os.cpu_count(), "threads": threads,
            "amx": "amx_bf16" in flags, "avx512_bf16": "avx512_bf16" in flags,
            "load_avg_at_end": os.getloadavg(), "torch": torch.__version__,
            "transformers": transformers.__version__, "trl": trl.__version__}  # fmt: skip


def command_line(a) -> str:
    args = ["python experiments/bench.py", f"--out {os.path.relpath(a.out, ROOT)}"]
    if a.quick:
        args.append("--quick")
    if a.threads != 1:
        args.append(f"--threads {a.threads}")
    if a.malloc_mmap_threshold != 1 << 20:
        args.append(f"--malloc-mmap-threshold {a.malloc_mmap_threshold}")
    if not a.quick and sorted(a.precisions) != ["bf16", "fp32"]:
        args.append("--precisions " + " ".join(a.precisions))
    if a.headline_only:
        args.append("--headline-only")
    if sorted(a.workloads) != ["real", "small"]:
        args.append("--workloads " + " ".join(a.workloads))
    if not a.quick and (a.real_steps, a.real_rounds) != (2, 2):
        args.append(f"--real-steps {a.real_steps} --real-rounds {a.real_rounds}")
    return " ".join(args)


def markdown(r: dict) -> str:
    m = r["machine"]
    mmap_threshold = r["protocol"].get("malloc_mmap_threshold", "glibc default (dynamic)")
    lines = [
        f"Command: `{r['command']}`{' (`make bench`)' if r['command'].endswith('runs/bench') else ''}, {m['threads']} thread(s) per process, "
        f"{m['cores']} cores, AMX {'yes' if m['amx'] else 'no'}, `MALLOC_MMAP_THRESHOLD_` {mmap_threshold}, torch {m['torch']}, "
        f"transformers {m['transformers']}, trl {m['trl']}; load average at the end {m['load_avg_at_end'][0]:.1f} "
        "(other jobs share the machine: timings are medians over alternating processes).",
    ]  # fmt: skip
    for name, wl in r["workloads"].items():
        w, pr = wl["workload"], wl["protocol"]
        lines += [
            "",
            f"**Workload {name}**: G = {w['G']}, {w['prompts_per_step']} prompts per step ({w['completions_per_step']} "
            f"completions), {w['new_tokens']} new tokens forced, β = {w['beta']}, μ = {w['mu']}, activation "
            f"checkpointing {'on' if w['gradient_checkpointing'] else 'off'} (both sides); {w['model']}; {w['data']}. "
            f"{pr['processes_per_side_and_precision']} process(es) per side, {pr['timed_steps_per_process']} timed "
            f"step(s) each after {pr['warmup_steps_per_process']} warm-up.",
            "",
            "| precision | side | median step (s) | CPU time (s) | completions/s | peak RSS (MiB) | RSS after setup (MiB) | speedup | speedup by CPU time | peak RSS ratio |",
            "|---|---|---|---|---|---|---|---|---|---|",
        ]  # fmt: skip
        precisions = {k: v for k, v in wl.items() if k in ("fp32", "bf16")}
        for precision, p in precisions.items():
            for side in ("ours", "trl"):
                s = p[side]
                speed = f"**{p['speedup']:.2f}×**" if side == "ours" else ""
                speed_cpu = f"{p['speedup_cpu_time']:.2f}×" if side == "ours" else ""
                ratio = f"**{p['peak_rss_ratio']:.2f}**" if side == "ours" else ""
                lines.append(f"| {precision} | {'ours' if side == 'ours' else 'TRL GRPOTrainer'} | {s['median_step_s']:.2f} | "
                             f"{s['median_step_cpu_s']:.2f} | {s['completions_per_s']:.2f} | {s['peak_rss_mb']:.0f} | "
                             f"{s['setup_rss_mb']:.0f} | {speed} | {speed_cpu} | {ratio} |")  # fmt: skip
        lines += ["", "Our step by phase (median s): " + "; ".join(
            f"{prec}: " + ", ".join(f"{k} {v:.2f}" for k, v in p["ours"]["phases_s"].items())
            for prec, p in precisions.items())]  # fmt: skip
    if r.get("sharing_real") is not None:
        lines += ["", "Real workload, our step with activation checkpointing on, prefix sharing on vs off (fp32):", "",
                  "| prefix sharing | step (s) | generate | reference | update |", "|---|---|---|---|---|"]  # fmt: skip
        for x in sorted(r["sharing_real"].values(), key=lambda x: not x["share_prefix"]):
            ph = x["phases_s"]
            lines.append(f"| {'on' if x['share_prefix'] else 'off'} | {x['step_s']:.2f} | {ph['generate']:.2f} | "
                         f"{ph['reference']:.2f} | {ph['update']:.2f} |")  # fmt: skip
    if r["group_sizes"] is not None:
        lines += extras_markdown(r)
    return "\n".join(lines) + "\n"


def extras_markdown(r: dict) -> list[str]:
    lines = []
    lines += ["", "Our step against G (fp32; prefill = the prompt forward alone, B = 2 prompts with their images):", "",
              "| G | prefix sharing | step (s) | completions/s | generate | reference | update | prefill (s) |",
              "|---|---|---|---|---|---|---|---|"]  # fmt: skip
    for x in sorted(r["group_sizes"].values(), key=lambda x: (x["G"], not x["share_prefix"])):
        ph = x["phases_s"]
        lines.append(f"| {x['G']} | {'on' if x['share_prefix'] else 'off'} | {x['step_s']:.2f} | "
                     f"{x['completions_per_s']:.1f} | {ph['generate']:.2f} | {ph['reference']:.2f} | "
                     f"{ph['update']:.2f} | {x['prefill_s']:.3f} |")  # fmt: skip
    h = r["lm_head"]
    lines += ["", "LM head on completion positions only vs all positions (fp32 forward+backward of one log-prob pass, "
              f"16 rows): {h['completion_positions']['fwd_bwd_s']:.2f} s with logits "
              f"{h['completion_positions']['logits_shape']} ({h['completion_positions']['logits_mb']:.1f} MiB) vs "
              f"{h['all_positions']['fwd_bwd_s']:.2f} s with {h['all_positions']['logits_shape']} "
              f"({h['all_positions']['logits_mb']:.1f} MiB)."]  # fmt: skip
    lines += ["", "Evaluation throughput (fp32, batch 16, k = 1, "
              f"{r['eval']['soft_rating']['max_new_tokens']} new tokens at most):", "",
              "| method | images | images/s |", "|---|---|---|"]  # fmt: skip
    for name, e in r["eval"].items():
        lines.append(f"| {name.replace('_', ' ')} | {e['images']} | {e['images_per_s']:.2f} |")
    return lines


def update_benchmarks_md(path: Path, table: str) -> None:
    """Replace the generated section of BENCHMARKS.md (between the markers), or append one."""
    text = path.read_text() if path.exists() else "# Benchmarks\n"
    block = f"{MARK_BEGIN}\n{table}{MARK_END}"
    if MARK_BEGIN in text and MARK_END in text:
        head, rest = text.split(MARK_BEGIN, 1)
        text = head + block + rest.split(MARK_END, 1)[1]
    else:
        text = text.rstrip("\n") + "\n\n" + block + "\n"
    path.write_text(text)


if __name__ == "__main__":
    main()
