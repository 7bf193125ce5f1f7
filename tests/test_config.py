"""Configuration errors and the training CLI's messages: a mistake in a config file or on the
command line is one clear line naming the key, never a run with a silently wrong value."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from common.config import ConfigError, load_config
from grpo.run.stream import check_data_folder
from grpo.train import main as train_main

ROOT = Path(__file__).resolve().parents[1]
TINY = ROOT / "experiments" / "tiny.yaml"


def test_overrides_are_typed_and_reach_their_field():
    cfg = load_config(TINY, ["grpo.group_size=4", "train.lr=3e-6", "model.freeze_vision=true",
                             "grpo.reward_weights={format: 0.5}", "eval.root="])  # fmt: skip
    assert cfg.grpo.group_size == 4 and cfg.train.lr == 3e-6  # YAML reads "3e-6" as a string: coerced
    assert cfg.model.freeze_vision is True and cfg.grpo.reward_weights == {"format": 0.5}
    assert cfg.eval.root == "" and cfg.train.steps == yaml.safe_load(TINY.read_text())["train"]["steps"]


@pytest.mark.parametrize(
    "override, words",
    [
        ("grpo.group_sise=4", ["unknown key", "grpo.group_sise", "group_size"]),  # lists the valid keys
        ("trian.lr=1e-3", ["unknown key", "trian", "train"]),
        ("grpo.group_size=four", ["grpo.group_size", "int", "'four'"]),
        ("grpo.group_size=4.5", ["grpo.group_size", "int", "4.5"]),
        ("train.lr=fast", ["train.lr", "float", "'fast'"]),
        ("model.lora_rank=true", ["model.lora_rank", "int"]),  # a bool is not an int
        ("model.freeze_vision=1", ["model.freeze_vision", "bool"]),
        ("grpo.reward_weights=3", ["grpo.reward_weights", "mapping"]),
        ("grpo=4", ["grpo", "mapping"]),
        ("grpo.group_size", ["section.key=value"]),
        ("grpo.group_size=1", ["group_size", "at least 2"]),
        ("grpo.kl_estimator=k2", ["kl_estimator", "'k2'"]),
        ("grpo.loss_agg=sum", ["loss_agg", "'sum'"]),
        ("grpo.ppo_epochs=0", ["ppo_epochs"]),
        ("grpo.kl_coef=-0.1", ["kl_coef"]),
        ("grpo.clip_eps=0", ["clip_eps"]),
        ("data.kind=laion", ["data.kind", "'laion'"]),
        ("data.pair_fraction=1.5", ["pair_fraction"]),
        ("train.lr_schedule=step", ["lr_schedule", "'step'"]),
        ("model.dtype=float64", ["model.dtype", "'float64'"]),
        ("eval.method=vote", ["eval.method", "'vote'"]),
    ],
)
def test_bad_overrides_are_config_errors_naming_the_key(override, words):
    with pytest.raises(ConfigError) as caught:
        load_config(TINY, [override])
    message = str(caught.value)
    assert all(w in message for w in words), f"{message!r} lacks one of {words}"
    assert "\n" not in message


def test_bad_files_are_config_errors(tmp_path):
    unknown = tmp_path / "unknown.yaml"
    unknown.write_text("grpo:\n  group_size: 4\n  beta: 0.1\n")  # β is kl_coef here
    with pytest.raises(ConfigError, match=r"grpo\.beta.*kl_coef"):
        load_config(unknown)
    listed = tmp_path / "list.yaml"
    listed.write_text("- grpo\n- train\n")
    with pytest.raises(ConfigError, match="mapping"):
        load_config(listed)


def _train_cli(argv: list[str], capsys) -> tuple[int, str]:
    """``python -m grpo.train ARGV`` in this process: its exit status and what it told the user
    (``SystemExit("message")`` is what Python prints and exits 1 with)."""
    with pytest.raises(SystemExit) as caught:
        train_main(argv)
    code = caught.value.code
    told = capsys.readouterr().err + (code if isinstance(code, str) else "")
    return (1 if isinstance(code, str) else code), told


def test_train_cli_reports_a_config_error_in_one_line(capsys):
    code, told = _train_cli([str(TINY), "grpo.group_sise=4"], capsys)
    lines = told.strip().splitlines()
    assert code == 2 and len(lines) == 1 and "grpo.group_sise" in lines[0]


def test_train_cli_says_what_to_download_before_loading_any_model(tmp_path, capsys):
    """A missing dataset folder: one line naming the folder, what to download and which key to
    set. The model does not exist either: loading it first would end in another error."""
    for config, source in (("imagereward.yaml", "THUDM/ImageRewardDB"), ("hpsv2.yaml", "ymhao/HPDv2")):
        missing = tmp_path / f"no-{source.split('/')[1]}"
        code, told = _train_cli([str(ROOT / "experiments" / config), f"data.root={missing}",
                                 f"model.name_or_path={tmp_path / 'no-model'}"], capsys)  # fmt: skip
        lines = told.strip().splitlines()
        assert code != 0 and len(lines) == 1, told
        assert str(missing) in lines[0] and source in lines[0] and "data.root=" in lines[0]
    code, told = _train_cli([str(ROOT / "experiments/imagereward.yaml"), f"data.root={tmp_path}",
                             f"eval.root={missing}"], capsys)  # fmt: skip
    assert code != 0 and str(missing) in told and "eval.root=" in told


@pytest.mark.parametrize("config", ["imagereward.yaml", "hpsv2.yaml"])
def test_the_readme_command_needs_only_data_root(config, tmp_path):
    """README: ``torchrun ... -m grpo.train experiments/imagereward.yaml data.root=/data/...``. The
    held-out evaluation reads the same folder unless eval.root says otherwise."""
    cfg = load_config(ROOT / "experiments" / config, [f"data.root={tmp_path}"])
    check_data_folder(cfg)  # no SystemExit
    assert (cfg.eval.root or cfg.data.root) == str(tmp_path)
