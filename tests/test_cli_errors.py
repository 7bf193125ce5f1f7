"""Bad input, the commands: bad data, a bad config, a missing or damaged model or checkpoint end in
one ``error: …`` line naming the file and a non-zero exit, never a traceback. A bad row that
a run reads anyway is counted in its summary and never changes the rating scale.

Most cases call each command's ``main`` in-process (a user error is ``SystemExit(2)`` with one
line on stderr); two run the real command in a subprocess to check what a user sees end to end.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from conftest import solid

from data.synthetic import main as synthetic_main
from data.synthetic import write_hpdv2
from eval.evaluate import main as evaluate_main
from eval.rank import PreferenceScorer
from eval.rank import main as rank_main
from grpo.coldstart import main as coldstart_main
from grpo.run.checkpoint import write_task
from grpo.train import main as train_main

ROOT = Path(__file__).resolve().parents[1]
TINY_YAML = str(ROOT / "experiments/tiny.yaml")
pytestmark = pytest.mark.usefixtures("one_thread")


def user_error(main, argv, capsys) -> str:
    """Run ``main(argv)``; it must exit 2 with exactly one ``error: …`` line on stderr. Returns it."""
    with pytest.raises(SystemExit) as exit_:
        main(argv)
    assert exit_.value.code == 2
    lines = [
        x for x in capsys.readouterr().err.strip().splitlines() if not x.startswith(("skipped", "WARNING"))
    ]
    assert lines and lines[-1].startswith("error: "), lines
    return lines[-1]


@pytest.fixture(scope="module")
def hpd(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("hpd") / "HPDv2"
    write_hpdv2(out, prompts=6, seed=4)
    return out


def damaged_copy(folder: Path, tmp_path: Path, name: str, how: str = "truncate") -> Path:
    dst = tmp_path / f"damaged-{folder.name}"
    shutil.copytree(folder, dst)
    path = dst / name
    if how == "truncate":
        path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])
    elif how == "delete":
        path.unlink()
    else:
        path.write_bytes(b"\x00garbled" + path.read_bytes()[8:])
    return dst


def train_args(model, data, out, *extra) -> list[str]:
    return [TINY_YAML, f"model.name_or_path={model}", f"data.root={data}", f"train.output_dir={out}",
            "train.steps=1", "train.save_every=0", "grpo.group_size=2", "grpo.prompts_per_step=2",
            "grpo.max_new_tokens=8", "eval.every=0", *extra]  # fmt: skip


# ----------------------------------------------------------------------------------- grpo.train


def test_train_config_errors(tmp_path, capsys):
    assert "nope.yaml" in user_error(train_main, [str(tmp_path / "nope.yaml")], capsys)
    assert "unknown key" in user_error(train_main, [TINY_YAML, "grpo.groupsize=4"], capsys)
    assert "rating_min" in user_error(train_main, [TINY_YAML, "data.rating_max=12"], capsys)
    bad_yaml = tmp_path / "bad.yaml"
    bad_yaml.write_text("model: [unclosed\n")
    assert "bad.yaml is not valid YAML" in user_error(train_main, [str(bad_yaml)], capsys)
    bad_yaml.write_bytes(b"model:\n  dtype: \xff\xfe\n")  # not UTF-8
    assert "bad.yaml" in user_error(train_main, [str(bad_yaml)], capsys)
    assert "not valid YAML" in user_error(train_main, [TINY_YAML, "train.lr=[1"], capsys)
    assert "must be int" in user_error(train_main, [TINY_YAML, "train.steps=many"], capsys)


def test_train_data_errors(tmp_path, hpd, tiny_dir, capsys):
    missing = user_error(train_main, train_args(tiny_dir, tmp_path / "no-data", tmp_path / "o"), capsys)
    assert "no-data" in missing and "not found" in missing
    broken = damaged_copy(hpd, tmp_path, "train.json", "garble")
    line = user_error(train_main, train_args(tiny_dir, broken, tmp_path / "o", "data.kind=hpdv2"), capsys)
    assert "train.json is not valid JSON" in line
    (broken / "train.json").write_bytes(b"")
    assert "train.json" in user_error(
        train_main, train_args(tiny_dir, broken, tmp_path / "o", "data.kind=hpdv2"), capsys
    )


def test_train_model_and_checkpoint_errors(tmp_path, synthetic_ir, tiny_dir, capsys):
    line = user_error(train_main, train_args("runs/no/such/model", synthetic_ir, tmp_path / "o"), capsys)
    assert line == "error: model folder runs/no/such/model not found"
    damaged = damaged_copy(tiny_dir, tmp_path, "model.safetensors")
    line = user_error(train_main, train_args(damaged, synthetic_ir, tmp_path / "o"), capsys)
    assert str(damaged / "model.safetensors") in line
    (tmp_path / "o2" / "checkpoint-000001").mkdir(parents=True)  # an empty checkpoint folder
    line = user_error(
        train_main, train_args(tiny_dir, synthetic_ir, tmp_path / "o2", "train.resume=auto"), capsys
    )
    assert "no intact checkpoint" in line and "trainer_state.json is missing" in line
    line = user_error(
        train_main,
        train_args(tiny_dir, synthetic_ir, tmp_path / "o", f"train.resume={tmp_path / 'x'}"),
        capsys,
    )
    assert "not found" in line


def test_train_with_all_prompts_too_long_is_an_error(tmp_path, synthetic_ir, tiny_dir, capsys):
    line = user_error(
        train_main, train_args(tiny_dir, synthetic_ir, tmp_path / "o", "data.max_prompt_tokens=2"), capsys
    )
    assert "data.max_prompt_tokens=2" in line and "prompt too long" in line


def test_train_counts_a_bad_rating_and_keeps_the_scale(tmp_path, synthetic_ir, cold_tiny_dir, capsys):
    data = tmp_path / "ir"
    shutil.copytree(synthetic_ir, data)
    meta = data / "metadata-train.parquet"
    t = pq.read_table(meta)
    ratings = t.column("overall_rating").to_pylist()
    ratings[0] = 8  # would have turned the 1-7 task into 1-8
    pq.write_table(t.set_column(t.schema.get_field_index("overall_rating"), "overall_rating", pa.array(ratings, pa.int8())), meta)  # fmt: skip
    out = tmp_path / "run"
    train_main(train_args(cold_tiny_dir, data, out, "train.device=cpu"))
    err = capsys.readouterr().err
    assert "'rating outside the scale': 1" in err, "the run's summary counts the row"
    task = json.loads((out / "checkpoint-000001" / "task.json").read_text())
    assert task["rating_values"] == [1, 2, 3, 4, 5, 6, 7]


# -------------------------------------------------------------------------------- eval.evaluate


def eval_args(model, data, out, *extra) -> list[str]:
    return [TINY_YAML, f"model.name_or_path={model}", f"data.root={data}", "eval.max_groups=2",
            "eval.max_new_tokens=6", "--out", str(out), "--no-progress", *extra]  # fmt: skip


def test_evaluate_model_errors(tmp_path, synthetic_ir, tiny_dir, capsys):
    line = user_error(
        evaluate_main, eval_args(tmp_path / "missing-model", synthetic_ir, tmp_path / "e"), capsys
    )
    assert "missing-model not found" in line
    damaged = damaged_copy(tiny_dir, tmp_path, "config.json", "garble")
    line = user_error(evaluate_main, eval_args(damaged, synthetic_ir, tmp_path / "e"), capsys)
    assert str(damaged / "config.json") in line
    damaged = damaged_copy(tiny_dir, tmp_path / "d2", "model.safetensors", "delete")
    line = user_error(evaluate_main, eval_args(damaged, synthetic_ir, tmp_path / "e"), capsys)
    assert "model.safetensors" in line and str(damaged) in line


def test_evaluate_data_errors(tmp_path, synthetic_ir, tiny_dir, capsys):
    broken = damaged_copy(synthetic_ir, tmp_path, "metadata-test.parquet")
    line = user_error(evaluate_main, eval_args(tiny_dir, broken, tmp_path / "e"), capsys)
    assert "metadata-test.parquet is not a readable parquet file" in line


def test_evaluate_reads_the_scale_from_the_checkpoint(tmp_path, synthetic_ir, tiny_dir, capsys):
    model = tmp_path / "model"
    shutil.copytree(tiny_dir, model)
    write_task(model, "rating", (2, 3, 4, 5, 6), "overall_rating")
    evaluate_main(eval_args(model, synthetic_ir, tmp_path / "e"))
    report = json.loads((tmp_path / "e" / "report.json").read_text())
    assert report["rating_values"] == [2, 3, 4, 5, 6]
    assert "task.json" in capsys.readouterr().err


# ------------------------------------------------------------------------------------ eval.rank


def test_rank_model_errors(tmp_path, tiny_dir, capsys):
    image = tmp_path / "a.png"
    solid("red").save(image)
    line = user_error(
        rank_main, ["--model", "runs/nope/checkpoint-000100", "--prompt", "p", str(image)], capsys
    )
    assert line == "error: model folder runs/nope/checkpoint-000100 not found"
    damaged = damaged_copy(tiny_dir, tmp_path, "tokenizer.json", "garble")
    line = user_error(rank_main, ["--model", str(damaged), "--prompt", "p", str(image)], capsys)
    assert str(damaged / "tokenizer.json") in line


def test_rank_prompt_errors(tmp_path, tiny_dir, capsys):
    image = tmp_path / "a.png"
    solid("red").save(image)
    line = user_error(
        rank_main, ["--model", str(tiny_dir), "--prompt", "bad \udcff byte", str(image)], capsys
    )
    assert "--prompt" in line and "UTF-8" in line
    line = user_error(rank_main, ["--model", str(tiny_dir), "--prompt", "a red circle " * 300, str(image),
                                  "--max-prompt-tokens", "64"], capsys)  # fmt: skip
    assert "--max-prompt-tokens=64" in line


def test_rank_says_when_the_same_file_appears_twice(tmp_path, tiny_dir, capsys):
    folder = tmp_path / "imgs"
    folder.mkdir()
    for colour in ("red", "blue"):
        solid(colour).save(folder / f"{colour}.png")
    again = folder / ".." / "imgs" / "red.png"
    rank_main(["--model", str(tiny_dir), "--prompt", "p", str(folder), str(again), "--max-new-tokens", "6"])
    captured = capsys.readouterr()
    assert "same file as" in captured.err and "ranked once" in captured.err
    rows = [x for x in captured.out.splitlines() if x.strip()[:1].isdigit()]
    assert len(rows) == 2


def test_scorer_uses_the_checkpoint_scale(tmp_path, tiny_dir):
    model = tmp_path / "model"
    shutil.copytree(tiny_dir, model)
    assert PreferenceScorer(str(model)).spec.rating_values == (1, 2, 3, 4, 5, 6, 7)
    write_task(model, "rating", (1, 2, 3, 4, 5), "overall_rating")
    assert PreferenceScorer(str(model)).spec.rating_values == (1, 2, 3, 4, 5)
    assert PreferenceScorer(str(model), scale=(3, 4)).spec.rating_values == (3, 4)


# ------------------------------------------------------------------ data.synthetic, grpo.coldstart


def test_synthetic_errors(tmp_path, capsys):
    occupied = tmp_path / "mine"
    occupied.mkdir()
    (occupied / "thesis.tex").write_text("precious")
    line = user_error(synthetic_main, [str(occupied), "--kind", "hpdv2", "--prompts", "2"], capsys)
    assert "not empty" in line and (occupied / "thesis.tex").read_text() == "precious"
    a_file = tmp_path / "a-file"
    a_file.write_text("x")
    assert "a-file" in user_error(synthetic_main, [str(a_file), "--kind", "hpdv2", "--prompts", "2"], capsys)


def test_coldstart_errors(tmp_path, synthetic_ir, tiny_dir, capsys):
    line = user_error(
        coldstart_main, [str(tmp_path / "no-model"), str(synthetic_ir), str(tmp_path / "o")], capsys
    )
    assert "no-model not found" in line
    line = user_error(coldstart_main, [str(tiny_dir), str(tmp_path / "no-data"), str(tmp_path / "o")], capsys)
    assert "no-data" in line


# --------------------------------------------------------------------------- real subprocesses


def _run(*args: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    return subprocess.run(
        [sys.executable, *args], capture_output=True, text=True, timeout=300, cwd=ROOT, env=env
    )


def test_commands_end_to_end_without_traceback(tmp_path, hpd, tiny_dir):
    image = tmp_path / "a.png"
    solid("red").save(image)
    r = _run("-m", "eval.rank", "--model", "runs/x/missing", "--prompt", "p", str(image))
    assert r.returncode == 2 and "Traceback" not in r.stderr and "Repo id" not in r.stderr
    assert r.stderr.strip().splitlines()[-1] == "error: model folder runs/x/missing not found"
    broken = damaged_copy(hpd, tmp_path, "test.json", "truncate")
    r = _run("-m", "grpo.train", TINY_YAML, f"model.name_or_path={tiny_dir}", f"data.root={broken}",
             "data.kind=hpdv2", "eval.every=1", f"train.output_dir={tmp_path / 'o'}")  # fmt: skip
    assert r.returncode == 2 and "Traceback" not in r.stderr, r.stderr[-2000:]
    assert "test.json is not valid JSON" in r.stderr.strip().splitlines()[-1]


def test_train_on_undecodable_images_is_one_line(tmp_path, synthetic_ir, tiny_dir, capsys):
    # every image member garbled inside intact zips: the reader cannot tell, the loader can
    import zipfile

    data = tmp_path / "ir"
    shutil.copytree(synthetic_ir, data)
    for z in (data / "images/train").glob("*.zip"):
        with zipfile.ZipFile(z) as zf:
            members = {n: zf.read(n) for n in zf.namelist()}
        with zipfile.ZipFile(z, "w") as zf:
            for name, payload in members.items():
                zf.writestr(name, payload if name.endswith(".json") else b"RIFF\x00\x00garbled webp")
    line = user_error(train_main, train_args(tiny_dir, data, tmp_path / "o"), capsys)
    assert "too many undecodable images" in line


def test_evaluate_with_no_decodable_image_is_a_data_error(tiny, tmp_path):
    from common.config import EvalConfig
    from common.errors import DataError
    from data.types import EvalGroup, ImageRef
    from eval.evaluate import evaluate

    bad = tmp_path / "bad.png"
    bad.write_bytes(b"\x89PNG\r\n\x1a\n truncated")
    groups = [
        EvalGroup("g", "a prompt", (ImageRef(str(bad)), ImageRef(str(tmp_path / "gone.png"))), (1.0, 2.0))
    ]
    model, processor = tiny
    with pytest.raises(DataError, match="no group could be evaluated"):
        evaluate(model, processor, groups, "imagereward", (1, 2, 3), EvalConfig(), 4, progress=False)


def test_output_folder_that_is_a_file_and_the_traceback_switch(
    tmp_path, synthetic_ir, tiny_dir, capsys, monkeypatch
):
    a_file = tmp_path / "run"
    a_file.write_text("not a folder")
    line = user_error(train_main, train_args(tiny_dir, synthetic_ir, a_file, "train.resume=auto"), capsys)
    assert str(a_file) in line
    monkeypatch.setenv("GRPO_TRACEBACK", "1")  # a user error with its traceback, for a bug report
    with pytest.raises(NotADirectoryError):
        train_main(train_args(tiny_dir, synthetic_ir, a_file, "train.resume=auto"))
