"""The memory plan (grpo.run.memory_plan): hand-checked counts, the CLI, and the plan against peak RSS measured on CPU."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from common.config import load_config
from grpo.memory import main
from grpo.run.memory_plan import GiB, model_shape, plan

# Run in a fresh process: training's peak RSS minus the RSS just before the model is built, next to
# the plan for the same config and the prompt length the data really has. The peak is the process's
# own high-water mark (VmHWM), not ru_maxrss: Linux carries ru_maxrss over from the forking parent,
# so under a large pytest process it reported ~1 GB for a run that peaks at ~350 MB.
MEASURE = r"""
import gc, json, re, sys
import torch
torch.set_num_threads(1)
from common.config import load_config
from grpo.run.memory_plan import model_shape, plan
from grpo.rollout import encode_samples
from data.read import read_train_set
from grpo.train import train
from models.qwen_vl import load_processor

cfg = load_config("experiments/tiny.yaml", sys.argv[1:])
train_set = read_train_set(cfg)
processor = load_processor(cfg.model.name_or_path)
samples = train_set.samples[: cfg.grpo.prompts_per_step]
inputs = encode_samples(processor, samples, [[r.load() for r in s.images] for s in samples], train_set.rating_values)
image = int((inputs["input_ids"][0] == processor.image_token_id).sum())
text = inputs["input_ids"].shape[1] - image
del processor, inputs
gc.collect()
shape = model_shape(cfg.model.name_or_path)
base = int(open("/proc/self/statm").read().split()[1]) * 4096
train(cfg)
peak = int(re.search(r"VmHWM:\s+(\d+) kB", open("/proc/self/status").read()).group(1)) * 1024
p = plan(cfg, shape, 1, 24 * 2**30, prompt_tokens=text, image_tokens=image)
print(json.dumps({"measured": peak - base, "plan": p["per_rank_bytes"], "phases": p["phase_bytes"],
                  "resident": p["resident_bytes"], "transient": p["transient_bytes"]}))
"""


def measure(*overrides) -> dict:
    env = {"OMP_NUM_THREADS": "1", "PATH": "/usr/bin:/bin", "HF_HUB_OFFLINE": "1"}
    proc = subprocess.run([sys.executable, "-c", MEASURE, *overrides], capture_output=True, text=True,
                          timeout=600, env=env)  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]
    return json.loads(proc.stdout.strip().splitlines()[-1])


def test_seven_b_counts_and_the_real_run_figures(real_files):
    shape = model_shape(str(real_files / "config.json"))
    # Qwen2.5-VL-7B: 8.29B parameters, of which the language model with its untied LM head is 7.62B
    assert shape.total == 8_292_166_656 and shape.language == 7_615_616_512
    assert (shape.layers, shape.hidden, shape.kv_dim, shape.vocab) == (28, 3584, 512, 152_064)
    cfg = load_config(
        "experiments/imagereward.yaml", [f"model.name_or_path={real_files}", "train.strategy=ddp"]
    )
    p = plan(cfg, shape, 8, 80 * GiB)
    r = p["resident_bytes"]
    # 16 B per trainable parameter without DDP's buckets: 4 + 4 + 8 → 7.62e9 · 16 = 121.9e9 B ("≈ 122 GB")
    assert r["weights"] + r["gradients"] - 4 * shape.language + r["optimizer"] == 16 * shape.language
    assert r["reference"] == 2 * shape.total  # the bf16 reference, 16.6 GB
    assert not p["fits"]
    p8 = plan(load_config("experiments/imagereward.yaml", [f"model.name_or_path={real_files}",
                                                           "train.strategy=fsdp"]), shape, 8, 80 * GiB)  # fmt: skip
    r8 = p8["resident_bytes"]
    assert r8["weights"] + r8["gradients"] + r8["optimizer"] == 16 * shape.language / 8  # "≈ 17 GB per GPU"
    assert p8["fits"]


def test_cli_json_and_knobs(real_files, capsys):
    main(["experiments/imagereward.yaml", f"model.name_or_path={real_files}", "train.strategy=ddp",
          "--gpus", "8", "--gpu-memory", "80", "--json"])  # fmt: skip
    p = json.loads(capsys.readouterr().out)
    assert p["fits"] is False and isinstance(p["per_rank_bytes"], int)
    assert "train.strategy=fsdp" in p["knobs"]
    main(
        [
            "experiments/imagereward.yaml",
            f"model.name_or_path={real_files}",
            "train.strategy=fsdp",
            "--gpus",
            "8",
        ]
    )
    out = capsys.readouterr().out
    assert "fits" in out and "DOES NOT FIT" not in out


def test_no_download(tmp_path, capsys):
    with pytest.raises(SystemExit) as exit_:
        main(["experiments/imagereward.yaml", f"model.name_or_path={tmp_path}/absent", "--gpus", "1"])
    assert exit_.value.code == 2 and "never downloads" in capsys.readouterr().err


@pytest.mark.slow
@pytest.mark.parametrize("preset", ["tiny", "like"])
def test_plan_against_peak_rss(preset, tiny_dir, like_dir, synthetic_ir, tmp_path):
    """The plan is an estimate; on CPU it must come within 35% of the measured peak (README: figures)."""
    model = tiny_dir if preset == "tiny" else like_dir
    common = [f"model.name_or_path={model}", f"data.root={synthetic_ir}", f"train.output_dir={tmp_path}",
              "train.steps=2", "train.save_every=0", "eval.every=0", "train.warmup_steps=1"]  # fmt: skip
    size = (["grpo.prompts_per_step=8", "grpo.group_size=8", "grpo.max_new_tokens=64", "grpo.minibatch_size=64"]
            if preset == "tiny" else
            ["grpo.prompts_per_step=2", "grpo.group_size=4", "grpo.max_new_tokens=24", "grpo.minibatch_size=8"])  # fmt: skip
    m = measure(*common, *size)
    print(preset, json.dumps(m))
    error = m["plan"] / m["measured"] - 1
    assert abs(error) < 0.35, f"plan {m['plan'] / 2**20:.0f} MiB vs measured {m['measured'] / 2**20:.0f} MiB"
