"""FSDP2 under torchrun with 2 gloo ranks on CPU: same weights as DDP, exact resume from
sharded checkpoints, and a consolidated folder that plain transformers, eval.evaluate and eval.rank load."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from conftest import solid, torchrun
from safetensors.torch import load_file

from common.config import ConfigError, load_config

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def runs(fsdp_run, cold_tiny_dir, synthetic_ir):
    """DDP and FSDP, 3 steps each from the same seed; FSDP with a sharded checkpoint every step."""
    root, fsdp = fsdp_run
    torchrun(root / "ddp", "train.strategy=ddp", "train.save_every=0", model=cold_tiny_dir, data=synthetic_ir)
    return root, fsdp


def test_fsdp_matches_ddp_after_three_steps(runs, cold_tiny_dir):
    root, proc = runs
    assert "memory plan: fsdp on 2" in proc.stderr, "grpo.train prints the plan at start"
    ddp = load_file(root / "ddp" / "checkpoint-000003" / "model.safetensors")
    fsdp = load_file(root / "fsdp" / "checkpoint-000003" / "model.safetensors")  # consolidated at the end
    start = load_file(Path(cold_tiny_dir) / "model.safetensors")
    assert set(ddp) == set(fsdp)
    moved = max(float((ddp[k] - start[k]).abs().max()) for k in ddp)
    assert moved > 1e-3, f"3 steps at lr 1e-3 must move the weights (moved {moved:.2e})"
    for k in ddp:
        torch.testing.assert_close(fsdp[k], ddp[k], rtol=0, atol=1e-5, msg=k)
    ddp_rows = (root / "ddp" / "metrics.jsonl").read_text().splitlines()
    fsdp_rows = (root / "fsdp" / "metrics.jsonl").read_text().splitlines()
    for a, b in zip(ddp_rows, fsdp_rows, strict=True):
        a, b = json.loads(a), json.loads(b)
        assert a["reward_mean"] == b["reward_mean"], "same samples on both strategies"
        assert b["loss"] == pytest.approx(a["loss"], abs=1e-5)


def test_sharded_checkpoints_and_bitwise_resume(runs, cold_tiny_dir, synthetic_ir):
    root, _ = runs
    ckpts = sorted(p.name for p in (root / "fsdp").iterdir() if p.name.startswith("checkpoint-"))
    assert ckpts == ["checkpoint-000001", "checkpoint-000002", "checkpoint-000003"]
    mid = root / "fsdp" / "checkpoint-000001"
    shards = sorted(p.name for p in (mid / "model_shards").iterdir())
    assert len(shards) == 2, f"each rank writes its own shard file: {shards}"
    assert not (mid / "model.safetensors").exists(), "only the last checkpoint is consolidated"
    state = json.loads((mid / "trainer_state.json").read_text())
    assert state["sharded"] and state["world"] == 2 and len(set(state["weight_checksums"])) == 1
    assert not list((root / "fsdp").glob(".tmp-*")), "no temporary folder left behind"

    # stop after step 1: a fresh run folder with only that checkpoint and its log, resumed to step 3
    resumed = root / "resumed"
    resumed.mkdir()
    shutil.copytree(mid, resumed / mid.name)
    lines = (root / "fsdp" / "metrics.jsonl").read_text().splitlines(keepends=True)
    (resumed / "metrics.jsonl").write_text(lines[0])
    torchrun(resumed, "train.strategy=fsdp", "train.save_every=1", "train.keep_last=3", "train.resume=auto",
             model=cold_tiny_dir, data=synthetic_ir)  # fmt: skip
    a = load_file(root / "fsdp" / "checkpoint-000003" / "model.safetensors")
    b = load_file(resumed / "checkpoint-000003" / "model.safetensors")
    assert all(torch.equal(a[k], b[k]) for k in a), "resumed FSDP run differs from the uninterrupted one"

    def strip(line):
        return {
            k: v
            for k, v in json.loads(line).items()
            if not k.startswith(("time/", "memory/")) and k != "tokens_per_s"
        }

    again = (resumed / "metrics.jsonl").read_text().splitlines()
    assert [strip(x) for x in again] == [strip(x) for x in lines]


def test_export_of_a_sharded_checkpoint_loads_and_scores(runs, synthetic_ir, tmp_path, capsys):
    from transformers import Qwen2_5_VLForConditionalGeneration

    from eval.evaluate import main as evaluate_main
    from eval.rank import main as rank_main
    from grpo.export import main as export_main

    root, _ = runs
    ckpt, out = root / "fsdp" / "checkpoint-000002", tmp_path / "exported"
    export_main([str(ckpt), str(out)])
    plain = Qwen2_5_VLForConditionalGeneration.from_pretrained(
        out, use_safetensors=True
    )  # plain transformers
    step3 = load_file(root / "fsdp" / "checkpoint-000003" / "model.safetensors")
    exported = load_file(out / "model.safetensors")  # the file's names (save_pretrained's), as step3's
    torch.testing.assert_close(plain.lm_head.weight, exported["lm_head.weight"], rtol=0, atol=0)
    diffs = [k for k in step3 if not torch.equal(exported[k], step3[k])]
    assert diffs, "step 2's weights are not step 3's"
    # one AdamW step at lr 1e-3 moves each weight by at most ~lr
    assert max(float((exported[k] - step3[k]).abs().max()) for k in step3) < 3e-3

    for colour in ("red", "green"):
        solid(colour).save(tmp_path / f"{colour}.png")
    rank_main(["--model", str(out), "--prompt", "a red circle", str(tmp_path / "red.png"),
               str(tmp_path / "green.png"), "--max-new-tokens", "8"])  # fmt: skip
    assert "red.png" in capsys.readouterr().out
    evaluate_main(["experiments/tiny.yaml", f"model.name_or_path={out}", f"data.root={synthetic_ir}",
                   "eval.max_groups=2", "eval.max_new_tokens=8", "--out", str(tmp_path / "ev"), "--no-progress"])  # fmt: skip
    report = json.loads((tmp_path / "ev" / "report.json").read_text())
    assert report["n_groups"] == 2


def test_lora_under_fsdp_is_refused_with_a_reason():
    from grpo.run.distributed import check_supported

    cfg = load_config("experiments/tiny.yaml", ["train.strategy=fsdp", "model.lora_rank=8"])
    with pytest.raises(ConfigError, match="use train.strategy=ddp"):
        check_supported(cfg, world=2)
    check_supported(cfg, world=1)  # one process never shards: LoRA runs as usual


@pytest.mark.parametrize(
    "overrides",
    [("model.dtype=bfloat16", "model.freeze_vision=true", "model.gradient_checkpointing=true"),
     ("grpo.kl_coef=0",)],
    ids=["shipped-bf16-frozen-vision-checkpointing", "beta-0"],
)  # fmt: skip
def test_fsdp_options_train(overrides, cold_tiny_dir, synthetic_ir, tmp_path):
    """The shipped 7B setting under FSDP: bf16 compute by MixedPrecisionPolicy over float32 masters,
    a bf16 frozen vision tower in its own units, activation checkpointing inside the units; and β = 0."""
    out = tmp_path / "run"
    torchrun(out, "train.strategy=fsdp", "train.steps=2", "train.save_every=0", *overrides,
             model=cold_tiny_dir, data=synthetic_ir)  # fmt: skip
    start = load_file(Path(cold_tiny_dir) / "model.safetensors")
    after = load_file(out / "checkpoint-000002" / "model.safetensors")
    assert after["lm_head.weight"].dtype == torch.float32, "the master weights stay float32"
    changed = {k for k in start if not torch.equal(start[k], after[k])}
    assert any("layers" in k for k in changed), "the language model trained"
    if "model.freeze_vision=true" in overrides:
        # stored in bf16 while frozen (model.dtype): equal to the start rounded to bf16
        visual = [k for k in start if "visual" in k]
        assert all(torch.equal(after[k].bfloat16(), start[k].bfloat16()) for k in visual), (
            "vision tower moved"
        )
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert all(r["loss"] == r["loss"] and r["grad_norm"] == r["grad_norm"] for r in rows), "no NaN"


def fsdp_update_on_fixed_rollouts(out: Path, args: list[str], positions_per_chunk: int | None, model) -> None:
    """``tests/ddp_driver.py --update-only`` on 2 ranks under FSDP2: one update on fixed rollouts,
    ``positions_per_chunk`` positions of logits per chunk (None: the default, one chunk here)."""
    from test_ddp import run_driver

    out.mkdir(parents=True, exist_ok=True)
    chunk = []
    if positions_per_chunk:
        vocab = json.loads((Path(model) / "config.json").read_text())["text_config"]["vocab_size"]
        chunk = [f"--chunk-bytes={4 * vocab * positions_per_chunk}"]
    run_driver(out, ["--update-only", *chunk], args)


def update_args(model, data, out: Path, *overrides: str) -> list[str]:
    return [
        "experiments/tiny.yaml", f"model.name_or_path={model}", f"data.root={data}", f"train.output_dir={out}",
        "train.device=cpu", "train.strategy=fsdp", "grpo.group_size=4", "grpo.max_new_tokens=16",
        "grpo.minibatch_size=4", *overrides,
    ]  # fmt: skip


def test_chunked_logprobs_under_fsdp_update_as_one_process(cold_tiny_dir, synthetic_ir, tmp_path):
    """The log-prob passes by chunks of positions (``models.logprobs.token_logprobs``) under FSDP2,
    where the LM head is its own unit, gathered for every chunk and again when the backward
    recomputes it: one update on fixed rollouts, 5 positions per chunk, moves the weights of both
    ranks as one process does with the whole sequence in one chunk (``tests/ddp_driver.py``)."""
    from test_ddp import assert_ranks_updated_as_one_process

    args = update_args(cold_tiny_dir, synthetic_ir, tmp_path / "run", "model.dtype=float32")
    fsdp_update_on_fixed_rollouts(tmp_path, args, 5, cold_tiny_dir)
    assert_ranks_updated_as_one_process(tmp_path, args)


def test_chunked_logprobs_under_fsdp_in_the_shipped_bf16_setting(cold_tiny_dir, synthetic_ir, tmp_path):
    """Several chunks of logits under FSDP2 in the setting the 7B experiments ship (bf16 compute over
    float32 masters, a frozen bf16 vision tower, activation checkpointing): one update on fixed
    rollouts with 5 positions per chunk moves every trained weight as the same two ranks do with one
    chunk, to within bf16's rounding of the partial sums."""
    shipped = ("model.dtype=bfloat16", "model.freeze_vision=true", "model.gradient_checkpointing=true")
    updates = {}
    for name, positions in (("one", None), ("chunked", 5)):
        out = tmp_path / name
        fsdp_update_on_fixed_rollouts(out, update_args(cold_tiny_dir, synthetic_ir, out / "run", *shipped),
                                      positions, cold_tiny_dir)  # fmt: skip
        start, after = (load_file(out / f"{kind}-rank0.safetensors") for kind in ("start", "update"))
        updates[name] = {n: after[n] - start[n] for n in after}
        rank1 = load_file(out / "update-rank1.safetensors")
        assert all(torch.equal(rank1[n], after[n]) for n in after), "the ranks hold one model"
    one, chunked = updates["one"], updates["chunked"]
    assert not any("visual" in n for n in one), "the vision tower is frozen"
    assert all(v.dtype == torch.float32 for v in one.values()), "the masters are float32"
    assert one["lm_head.weight"].norm() > 0
    for n in one:
        err, size = (chunked[n] - one[n]).norm().item(), one[n].norm().item()
        assert err <= 0.03 * size + 1e-6, f"{n}: chunked update differs by {err:.3g} of {size:.3g}"
