"""Experiment configuration: nested dataclasses, set by a YAML file and ``key.sub=value`` overrides.

    python -m grpo.train experiments/imagereward.yaml grpo.group_size=4 train.lr=3e-6

Every field carries a docstring-style comment naming the paper's symbol where there is one
(G, β, ε, μ). Unknown keys and values of the wrong type are errors; the resolved config is
written next to every run and checkpoint (``config.yaml``).
"""

from __future__ import annotations

import dataclasses
import importlib.util
import types
import typing
from dataclasses import asdict, dataclass, field
from pathlib import Path

import yaml

from common.errors import UserError

# LoRA targets: the language model's projections only (the vision blocks also have gate/up/down).
LANGUAGE_LORA_TARGET = r".*language_model.*\.(q_proj|k_proj|v_proj|o_proj|gate_proj|up_proj|down_proj)"
VISION_LORA_TARGET = r".*visual\.blocks.*\.(qkv|proj|gate_proj|up_proj|down_proj)"


@dataclass(frozen=True)
class SamplingSpec:
    """How completions are sampled: the one home of the sampling defaults, built from the config
    (``GRPOConfig.sampling``; evaluation: ``eval.score.ScoringSpec.sampling``) and passed down. The
    functions of ``models`` take its fields as plain numbers, and default to these values."""

    max_new_tokens: int = 256
    """Completion length limit in tokens."""
    temperature: float = 1.0
    """τ: tokens are drawn from softmax(logits / τ), and GRPO's log-probs are taken at the same τ.
    Soft scores are read at τ = 1 whatever τ sampled the reasoning (``models.soft_head``)."""
    share_prefix: bool = True
    """Prefill each prompt and its images once and continue it G times with our own sampling loop
    (``models.sampling.sample_shared_prefix``); off: ``generate`` with every prompt repeated G times."""


@dataclass
class ModelConfig:
    name_or_path: str = "Qwen/Qwen2.5-VL-7B-Instruct"
    """Hub id or local folder of a Qwen2.5-VL-*-Instruct checkpoint (or a tiny folder)."""
    dtype: str = "bfloat16"
    """float32 | bfloat16: the storage dtype of frozen weights (the reference copy, a frozen vision
    tower, LoRA's base model) and, when bfloat16, the compute dtype (autocast). Trainable weights
    are always float32 master weights (grpo.policy). float16 is refused: without loss scaling its
    gradients overflow within a step."""
    lora_rank: int = 0
    """LoRA rank r; 0 means full fine-tuning with a frozen reference copy."""
    lora_alpha: int = 128
    """LoRA scaling α (the update is scaled by α / r)."""
    lora_dropout: float = 0.0
    """Dropout on the LoRA input. 0 by default: with dropout on, the update pass scores completions
    with a different network than the one that sampled them, so ρ ≠ 1 on policy (μ > 1 included)."""
    freeze_vision: bool = True
    """Keep the vision tower fixed (full fine-tuning: no grad; LoRA: no adapters on it)."""
    gradient_checkpointing: bool = False
    """Recompute activations in the backward pass to save memory."""
    min_pixels: int = 0
    """Override the processor's minimum image area in pixels (0 keeps the checkpoint's)."""
    max_pixels: int = 0
    """Override the processor's maximum image area in pixels (0 keeps the checkpoint's)."""
    attn_implementation: str = ""
    """Attention kernel (sdpa, flash_attention_2, eager); empty keeps the default."""


@dataclass
class DataConfig:
    kind: str = "imagereward"
    """Dataset format: imagereward (single image, rating) | hpdv2 (two images, 0/1)."""
    root: str = "datasets/ImageRewardDB"
    """Local dataset folder, as downloaded (docs/data-and-metrics.md)."""
    split: str = "train"
    """Training split (ImageRewardDB: train | validation)."""
    subset: str = ""
    """ImageRewardDB training subset: 1k | 2k | 4k | 8k; empty means the whole split."""
    rating_field: str = "overall_rating"
    """ImageRewardDB column used as the target rating."""
    rating_min: int = 1
    """Lowest rating of the scale the model answers on (ImageRewardDB: 1). Rows rated outside
    rating_min..rating_max, NaN or fractional are skipped and counted; the scale is never read
    from the data, so one bad row cannot change the task. Saved with every checkpoint."""
    rating_max: int = 7
    """Highest rating of the scale (ImageRewardDB overall_rating: 7). Single digits only: the
    soft head reads one answer token per rating."""
    max_prompt_tokens: int = 512
    """Prompts longer than this many tokens (the dataset's prompt text alone) are skipped and
    counted; ImageRewardDB and HPDv2 prompts are far shorter. 0 = no limit."""
    pair_fraction: float = 0.25
    """HPDv2: fraction of the training pairs used (the paper: a random 25%)."""
    seed: int = 0
    """Seed of the HPDv2 subset and pair-order shuffling."""
    max_samples: int = 0
    """Use only the first N training samples (0 = all); for smoke tests."""

    @property
    def rating_values(self) -> tuple[int, ...]:
        """The configured rating scale ``(rating_min, …, rating_max)``."""
        return tuple(range(self.rating_min, self.rating_max + 1))


@dataclass
class GRPOConfig:
    group_size: int = 8
    """G: completions sampled per prompt; advantages are normalised within each group."""
    prompts_per_step: int = 8
    """B: prompts per step and per process (each step trains on N = B·G completions)."""
    max_new_tokens: int = SamplingSpec.max_new_tokens
    """Completion length limit in tokens."""
    temperature: float = SamplingSpec.temperature
    """Sampling temperature; log-probs are computed at the same temperature."""
    clip_eps: float = 0.2
    """ε: the ratio π_θ/π_θold is clipped to [1−ε, 1+ε]."""
    clip_eps_low: float = 0.0
    """ε_low: the ratio's lower clip bound is 1 − ε_low; 0 = ε."""
    clip_eps_high: float = 0.0
    """ε_high: the ratio's upper clip bound is 1 + ε_high; 0 = ε, the paper's symmetric clip.
    DAPO's "clip-higher" (arXiv 2503.14476): 0.28 with ε_low = 0.2."""
    loss_type: str = "grpo"
    """The objective (docs/math.md): grpo (the paper's: per-completion mean, group std) | dr_grpo
    (arXiv 2503.20783: no std, a constant normaliser) | dapo (arXiv 2503.14476: one mean over the
    batch's tokens) | bnpo (token mean and the batch's std, arXiv 2508.08221). It sets the
    defaults of loss_agg and scale_rewards (``LOSS_TYPES``); either key overrides its part."""
    importance_sampling_level: str = "token"
    """token (the paper's ratio per token) | sequence (GSPO, arXiv 2507.18071: one ratio per
    completion, the geometric mean of its token ratios). Equal to token at μ = 1 under seq-mean."""
    scale_rewards: str = ""
    """What divides r − mean(group): group (its std, the paper's) | batch (the std of all B·G
    rewards) | none (nothing, Dr. GRPO); empty = the loss_type's."""
    dynamic_sampling: bool = False
    """DAPO's dynamic sampling (arXiv 2503.14476 §3.2): groups whose rewards all agree (reward std
    0, no gradient) are dropped and replaced by groups of fresh prompts (grpo.dynamic_sampling)."""
    dynamic_sampling_max_rounds: int = 3
    """Budget of dynamic sampling: extra sampling rounds per step, each of as many fresh prompts as
    groups are missing, so at most (1 + rounds)·B groups per step. When it runs out, the step
    trains on the groups with spread plus the first flat ones and logs that."""
    kl_coef: float = 0.04
    """β: weight of the KL penalty to the frozen reference policy; 0 skips the reference."""
    kl_estimator: str = "k3"
    """KL estimator: k3 (unbiased, non-negative) | k1 (log π/π_ref, the paper's literal form; as a
    loss term on-policy its expected gradient is zero, so it logs the KL but does not restrain it)."""
    ppo_epochs: int = 1
    """μ: policy updates per batch of rollouts; μ > 1 stores old log-probs in the buffer."""
    minibatch_size: int = 16
    """Completions per forward/backward pass (gradient accumulation over the batch)."""
    loss_agg: str = ""
    """Loss aggregation: seq-mean (per completion, then mean) | token-mean | budget-mean (sum over
    N · max_new_tokens); empty = the loss_type's."""
    reward_weights: dict[str, float] = field(default_factory=dict)
    """Weight of each reward component (format, exact, approx); missing ones weigh 1."""
    share_prefix: bool = SamplingSpec.share_prefix
    """Run each prompt and its images through the model once per group, not G times: sampling
    prefills it once and its G completions share the KV cache, and the log-prob passes attend
    the completions to one prompt forward. Same values and gradients (to float rounding); off
    repeats every prompt G times, as ``generate(num_return_sequences=G)`` does."""

    @property
    def sampling(self) -> SamplingSpec:
        """The rollouts' sampling spec."""
        return SamplingSpec(self.max_new_tokens, self.temperature, self.share_prefix)

    @property
    def aggregation(self) -> str:
        """The loss aggregation: ``loss_agg``, else the loss_type's."""
        return self.loss_agg or LOSS_TYPES[self.loss_type][0]

    @property
    def reward_scaling(self) -> str:
        """The advantages' divisor: ``scale_rewards``, else the loss_type's."""
        return self.scale_rewards or LOSS_TYPES[self.loss_type][1]

    @property
    def clip_range(self) -> tuple[float, float]:
        """(ε_low, ε_high): ``clip_eps_low`` / ``clip_eps_high`` where set, else ε."""
        return self.clip_eps_low or self.clip_eps, self.clip_eps_high or self.clip_eps


# grpo.loss_type → (loss aggregation, reward scaling) it stands for; the formulas: grpo/loss.py,
# grpo/advantages.py. grpo.loss_agg and grpo.scale_rewards override either part.
LOSS_TYPES = {
    "grpo": ("seq-mean", "group"),  # DeepSeekMath eq. 3, as arXiv 2503.19948 trains
    "dr_grpo": ("budget-mean", "none"),  # arXiv 2503.20783
    "dapo": ("token-mean", "group"),  # arXiv 2503.14476
    "bnpo": ("token-mean", "batch"),  # TRL's loss_type="bnpo" with scale_rewards="batch"
}


@dataclass
class TrainConfig:
    output_dir: str = "runs/imagereward"
    """Folder of the run: config.yaml, metrics.jsonl, completions.jsonl, checkpoints."""
    steps: int = 1000
    """Number of GRPO steps."""
    lr: float = 1e-6
    """Peak learning rate of AdamW."""
    warmup_steps: int = 20
    """Linear warm-up steps (Adam's first steps otherwise move every weight by lr)."""
    lr_schedule: str = "constant"
    """After warm-up: constant | cosine (to 10% of the peak) | linear (to 0)."""
    weight_decay: float = 0.0
    """AdamW weight decay."""
    max_grad_norm: float = 1.0
    """Gradient clipping by global norm."""
    bf16: bool = False
    """bf16 autocast for the forward passes with float32 weights (fast on GPUs and on CPUs with AMX);
    implied by model.dtype=bfloat16."""
    seed: int = 0
    """Seed of the data order, the sampling and the weight init of LoRA adapters."""
    device: str = "auto"
    """cpu | cuda | auto (cuda when available)."""
    strategy: str = "ddp"
    """How ranks under torchrun hold the model (grpo.run.distributed): ddp (every rank a full copy of
    weights, gradients, Adam moments and reference; for models whose 16 B per trainable parameter
    fit one GPU, and LoRA) | fsdp (FSDP2: weights, gradients, moments and reference sharded over
    the ranks, each decoder layer and vision block its own unit; for full fine-tuning of the 7B
    and larger). ``python -m grpo.memory`` says which fits."""
    save_every: int = 100
    """Write a checkpoint every N steps (and always at the end); 0 = only at the end."""
    keep_last: int = 2
    """Number of checkpoints kept."""
    save_merged: bool = False
    """With LoRA: also save the merged full model next to the adapter."""
    resume: str = ""
    """auto (the newest checkpoint in output_dir, if any) | a checkpoint folder | empty."""
    log_completions: int = 4
    """Sample completions written to completions.jsonl per step."""
    report_to: list[str] = field(default_factory=list)
    """Where the run is watched live (``grpo.run.tracking``, docs/monitoring.md): any of tensorboard
    (event files under output_dir/tensorboard) and wandb (the optional ``wandb`` extra; offline with
    WANDB_MODE=offline, project from WANDB_PROJECT), or none. Empty or none: metrics.jsonl only.
    A comma list on the command line: ``train.report_to=tensorboard,wandb``."""
    samples_every: int = 50
    """Send a table of the step's first log_completions completions (prompt, image thumbnails,
    completion, reward, advantage) to the trackers every N steps; 0 = never."""


@dataclass
class EvalConfig:
    every: int = 0
    """Evaluate on the held-out groups every N steps and at the end (0 = never during training).
    Logs accuracy and the spread of soft scores, which collapses when GRPO finds a constant answer."""
    root: str = ""
    """Evaluation dataset folder (defaults to data.root)."""
    split: str = "test"
    """Evaluation split."""
    max_groups: int = 0
    """Evaluate on the first N prompts only (0 = all)."""
    k: int = 1
    """Mean@k: soft scores averaged over k reasoning rollouts."""
    max_new_tokens: int = 0
    """Completion length at evaluation (0 = grpo.max_new_tokens)."""
    temperature: float = SamplingSpec.temperature
    """Sampling temperature of the evaluation rollouts."""
    method: str = "auto"
    """auto (rating for imagereward, anchor for hpdv2) | rating | anchor."""
    seed: int = 0
    """Seed of the evaluation rollouts and the anchor choice."""
    batch_size: int = 16
    """Prompts (rating) or comparisons (anchor) per generate call."""
    swap_groups: int = 16
    """Pairwise methods: the comparisons of the first N groups are also asked with the images
    swapped (one rollout each) to measure position consistency (eval.diagnostics); 0 = never.
    A debiased run (--debias) asks every comparison both ways and needs no extra pass."""


@dataclass
class Config:
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    grpo: GRPOConfig = field(default_factory=GRPOConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)

    @property
    def eval_root(self) -> str:
        """The evaluation dataset folder: ``eval.root``, else ``data.root``."""
        return self.eval.root or self.data.root

    @property
    def eval_max_new_tokens(self) -> int:
        """Completion length at evaluation: ``eval.max_new_tokens``, else ``grpo.max_new_tokens``."""
        return self.eval.max_new_tokens or self.grpo.max_new_tokens

    def validate(self) -> None:
        g, t = self.grpo, self.train
        _check(g.group_size >= 2, "grpo.group_size (G) must be at least 2: advantages compare completions")
        _check(g.kl_estimator in ("k1", "k3"), f"grpo.kl_estimator must be k1 or k3, got {g.kl_estimator!r}")
        _check(
            g.loss_agg in ("", "seq-mean", "token-mean", "budget-mean"),
            f"grpo.loss_agg: seq-mean, token-mean or budget-mean, not {g.loss_agg!r}",
        )
        _check(g.loss_type in LOSS_TYPES, f"grpo.loss_type: one of {list(LOSS_TYPES)}, not {g.loss_type!r}")
        _check(g.importance_sampling_level in ("token", "sequence"),
               f"grpo.importance_sampling_level: token or sequence, not {g.importance_sampling_level!r}")  # fmt: skip
        _check(g.scale_rewards in ("", "group", "batch", "none"),
               f"grpo.scale_rewards: group, batch or none, not {g.scale_rewards!r}")  # fmt: skip
        _check(0 <= g.clip_eps_low < 1 and g.clip_eps_high >= 0,
               "grpo.clip_eps_low must be in [0, 1) and grpo.clip_eps_high ≥ 0 (0 = grpo.clip_eps)")  # fmt: skip
        _check(g.dynamic_sampling_max_rounds >= 0, "grpo.dynamic_sampling_max_rounds must be ≥ 0")
        _check(not (g.dynamic_sampling and t.strategy == "fsdp"),
               "grpo.dynamic_sampling needs train.strategy=ddp: under FSDP every rank must sample the "
               "same number of rounds")  # fmt: skip
        _check(g.ppo_epochs >= 1, "grpo.ppo_epochs (μ) must be ≥ 1")
        _check(g.kl_coef >= 0 and g.clip_eps > 0, "grpo.kl_coef must be ≥ 0 and grpo.clip_eps > 0")
        _check(
            self.data.kind in ("imagereward", "hpdv2"),
            f"data.kind: imagereward or hpdv2, not {self.data.kind!r}",
        )
        _check(
            t.lr_schedule in ("constant", "cosine", "linear"), f"unknown train.lr_schedule {t.lr_schedule!r}"
        )
        _check(
            self.model.dtype != "float16",
            "model.dtype=float16 is not supported: without loss scaling its gradients overflow in one "
            "step; use bfloat16 (trainable weights stay float32 either way)",
        )
        _check(
            self.model.dtype in ("float32", "bfloat16"),
            f"model.dtype: float32 or bfloat16, not {self.model.dtype!r}",
        )
        _check(t.strategy in ("ddp", "fsdp"), f"train.strategy: ddp or fsdp, not {t.strategy!r}")
        unknown = set(t.report_to) - {"tensorboard", "wandb", "none"}
        _check(not unknown, f"train.report_to: tensorboard, wandb or none, not {sorted(unknown)}")
        _check(
            "wandb" not in t.report_to or importlib.util.find_spec("wandb") is not None,
            "train.report_to=wandb needs the wandb package: pip install -e '.[wandb]'",
        )
        _check(self.eval.method in ("auto", "rating", "anchor"), f"unknown eval.method {self.eval.method!r}")
        _check(0 < self.data.pair_fraction <= 1, "data.pair_fraction must be in (0, 1]")
        _check(
            0 <= self.data.rating_min < self.data.rating_max <= 9,
            f"data.rating_min..rating_max must be single digits with min < max, got "
            f"{self.data.rating_min}..{self.data.rating_max}",
        )
        _check(self.data.max_prompt_tokens >= 0, "data.max_prompt_tokens must be ≥ 0 (0 = no limit)")


class ConfigError(UserError, ValueError):
    """A config file or override that does not match the dataclasses."""


def _check(ok: bool, message: str) -> None:
    if not ok:
        raise ConfigError(message)


def load_config(path: str | Path | None = None, overrides: list[str] = ()) -> Config:
    """Read a YAML experiment, apply ``section.key=value`` overrides, type-check, validate."""
    raw = {}
    if path is not None:
        try:
            with open(path, "rb") as fh:
                raw = yaml.safe_load(fh) or {}
        except yaml.YAMLError as e:
            raise ConfigError(f"{path} is not valid YAML: {' '.join(str(e).split())}") from e
        if not isinstance(raw, dict):
            raise ConfigError(f"{path}: expected a mapping of sections, got {type(raw).__name__}")
    for item in overrides:
        if "=" not in item:
            raise ConfigError(f"override {item!r} is not of the form section.key=value")
        dotted, value = item.split("=", 1)
        keys = dotted.split(".")
        node = raw
        for key in keys[:-1]:
            node = node.setdefault(key, {})
            if not isinstance(node, dict):
                raise ConfigError(f"override {item!r}: {key} is not a section")
        try:
            node[keys[-1]] = yaml.safe_load(value) if value != "" else ""
        except yaml.YAMLError as e:
            raise ConfigError(f"override {item!r}: the value is not valid YAML") from e
    config = _build(Config, raw, "")
    config.validate()
    return config


def _build(cls, raw: dict, where: str):
    if not isinstance(raw, dict):
        raise ConfigError(f"{where or 'config'}: expected a mapping, got {raw!r}")
    hints = typing.get_type_hints(cls)
    names = {f.name for f in dataclasses.fields(cls)}
    unknown = set(raw) - names
    if unknown:
        raise ConfigError(f"unknown key(s) {sorted(where + k for k in unknown)}; valid: {sorted(names)}")
    values = {}
    for name, value in raw.items():
        hint = hints[name]
        if dataclasses.is_dataclass(hint):
            values[name] = _build(hint, value, f"{where}{name}.")
        else:
            values[name] = _coerce(value, hint, f"{where}{name}")
    return cls(**values)


def _coerce(value, hint, name: str):
    origin = typing.get_origin(hint)
    if origin is dict:
        if not isinstance(value, dict):
            raise ConfigError(f"{name} must be a mapping, got {value!r}")
        _, vtype = typing.get_args(hint)
        return {str(k): _coerce(v, vtype, f"{name}.{k}") for k, v in value.items()}
    if origin is list:  # a YAML list, or a comma list from the command line
        items = [v for v in value.split(",") if v.strip()] if isinstance(value, str) else value
        if not isinstance(items, list):
            raise ConfigError(f"{name} must be a list, got {value!r}")
        (itype,) = typing.get_args(hint)
        return [
            _coerce(v.strip() if isinstance(v, str) else v, itype, f"{name}[{i}]")
            for i, v in enumerate(items)
        ]
    if origin in (typing.Union, types.UnionType):
        raise ConfigError(f"{name}: union types are not supported in configs")
    if hint is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if hint is float and isinstance(value, str):  # YAML 1.1 reads "3e-6" (no dot) as a string
        try:
            return float(value)
        except ValueError:
            raise ConfigError(f"{name} must be float, got {value!r}") from None
    if hint is str and value is None:
        return ""
    if not isinstance(value, hint) or (hint is int and isinstance(value, bool)):
        raise ConfigError(f"{name} must be {hint.__name__}, got {value!r} ({type(value).__name__})")
    return value


def to_dict(config: Config) -> dict:
    return asdict(config)


def save_config(config: Config, path: str | Path) -> None:
    Path(path).write_text(yaml.safe_dump(to_dict(config), sort_keys=False))
