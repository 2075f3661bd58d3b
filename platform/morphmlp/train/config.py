"""The training job's configuration: one typed tree, resolved once in the driver.

Precedence, lowest to highest: dataclass defaults (the release's Kinetics-400 recipe) → the
variant's recipe file (recipes/<variant>.yaml, e.g. the demo recipe for `xs`) → a user YAML
(`--config`) → CLI flags. The resolved tree is what every worker receives and what MLflow records.
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass, field
from typing import Any, Literal

from morphmlp.config import ConfigError, apply_overrides, from_dict, load_yaml, merge, to_dict
from morphmlp.data.config import DataConfig

RECIPES_DIR = os.path.join(os.path.dirname(__file__), "recipes")


@dataclass
class ModelSection:
    variant: str = "xs"  # registered name (xs, s, b, ...) or a variant YAML written by the search
    num_frames: int | None = None  # None: the variant's default (xs 8, s/b 16)
    img_size: int | None = None  # None: the variant's default (xs 112, s/b 224)
    drop_path_rate: float | None = None  # None: the release's (0.1 for s, 0.3 for b)
    pretrained: str | None = None  # image checkpoint (inflated) or a release/our checkpoint
    grad_checkpointing: bool = False
    compile: bool = False


@dataclass
class OptimConfig:
    epochs: int = 60
    batch_size: int = 8  # per worker; the release: 64 clips over 8 GPUs
    grad_accum_steps: int = 1
    lr: float = 2e-4  # at `lr_reference_batch`; scaled linearly with the global batch
    lr_reference_batch: int = 64
    min_lr: float = 1e-6
    warmup_epochs: float = 10.0
    warmup_start_lr: float = 1e-6
    weight_decay: float = 0.05
    betas: tuple[float, float] = (0.9, 0.999)
    clip_grad_norm: float | None = None  # the release doesn't clip
    label_smoothing: float = 0.1
    mixup_alpha: float = 0.8
    cutmix_alpha: float = 1.0
    mixup_prob: float = 1.0
    mixup_switch_prob: float = 0.5
    precision: Literal["auto", "bf16", "fp16", "fp32"] = "auto"  # auto: bf16 on GPU, fp32 on CPU

    def __post_init__(self) -> None:
        _positive(self, "epochs", "batch_size", "grad_accum_steps", "lr", "lr_reference_batch")
        if not 0 <= self.warmup_epochs <= self.epochs:
            raise ConfigError(f"optim.warmup_epochs={self.warmup_epochs} must be in [0, epochs]")
        if not 0 <= self.label_smoothing < 1:
            raise ConfigError(f"optim.label_smoothing={self.label_smoothing} must be in [0, 1)")
        if self.clip_grad_norm is not None and self.clip_grad_norm <= 0:
            raise ConfigError(f"optim.clip_grad_norm={self.clip_grad_norm} must be > 0 or null")


@dataclass
class ScalingSection:
    workers: int = 1
    gpus_per_worker: float = 0.0
    cpus_per_worker: float = 1.0  # keep low on small machines: Ray Data decodes on the rest
    max_failures: int = 3  # worker/node failures survived by restarting from the checkpoint

    def __post_init__(self) -> None:
        _positive(self, "workers")
        if self.gpus_per_worker < 0 or self.cpus_per_worker < 0:
            raise ConfigError("scaling.gpus_per_worker and scaling.cpus_per_worker must be >= 0")


@dataclass
class RunSection:
    name: str | None = None  # None: derived from variant, frames and dataset (re-running resumes)
    storage: str = "runs"  # local path or URI (s3://bucket/prefix) for checkpoints
    experiment: str = "morphmlp-train"
    seed: int = 0
    checkpoint_every_steps: int = 0  # 0: only at epoch ends
    keep_last: int = 2  # checkpoints kept for resume; the best by val top-1 is kept apart
    log_every_steps: int = 10
    register_model: bool = True  # register best and final as versions of `morphmlp` in MLflow

    def __post_init__(self) -> None:
        _positive(self, "keep_last", "log_every_steps")
        if self.checkpoint_every_steps < 0:
            raise ConfigError("run.checkpoint_every_steps must be >= 0")


@dataclass
class TrainJobConfig:
    dataset: str = "demo"  # index URI (Parquet) or `demo` for the built-in dataset
    model: ModelSection = field(default_factory=ModelSection)
    data: DataConfig = field(default_factory=DataConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    scaling: ScalingSection = field(default_factory=ScalingSection)
    run: RunSection = field(default_factory=RunSection)

    @property
    def global_batch(self) -> int:
        return self.optim.batch_size * self.scaling.workers * self.optim.grad_accum_steps

    @property
    def scaled_lr(self) -> float:
        return self.optim.lr * self.global_batch / self.optim.lr_reference_batch


# The jobs' flags: flag -> (dotted config key, type, help). jobs/train.py takes them all,
# jobs/tune.py those that make sense for every trial.
FLAGS: dict[str, tuple[str, type, str]] = {
    "variant": ("model.variant", str, "xs, s, b, or a variant YAML written by jobs/tune.py"),
    "frames": ("model.num_frames", int, "input frames (default: the variant's)"),
    "img_size": ("model.img_size", int, "input crop size (default: the variant's)"),
    "pretrained": ("model.pretrained", str, "image or release checkpoint to start from"),
    "dataset": ("dataset", str, "index URI (Parquet) or `demo`"),
    "epochs": ("optim.epochs", int, "training epochs"),
    "batch_size": ("optim.batch_size", int, "clips per worker per step"),
    "lr": ("optim.lr", float, "learning rate at optim.lr_reference_batch (scaled with batch)"),
    "workers": ("scaling.workers", int, "Ray Train workers (DDP ranks)"),
    "gpus_per_worker": ("scaling.gpus_per_worker", float, "GPUs per worker (0: CPU, gloo)"),
    "cpus_per_worker": ("scaling.cpus_per_worker", float, "CPUs reserved per worker"),
    "storage": ("run.storage", str, "where runs go: a path or s3://bucket/prefix"),
    "name": ("run.name", str, "run name (default: <variant>-<frames>x<size>-<dataset>)"),
    "experiment": ("run.experiment", str, "MLflow experiment"),
    "seed": ("run.seed", int, "random seed"),
}


def tree_from_cli(config: str | None, flags: dict[str, Any], sets: list[str]) -> dict[str, Any]:
    """The user's config tree: the --config YAML, then the flags (by FLAGS name; None = not
    given), then the --set KEY=VALUE overrides."""
    tree = load_yaml(config) if config else {}
    given = [f"{FLAGS[f][0]}={value}" for f, value in flags.items() if value is not None]
    return apply_overrides(merge(tree, apply_overrides({}, given)), sets)


def recipe_for(variant: str) -> dict[str, Any]:
    """The variant's own recipe (e.g. the demo recipe for xs); {} when it has none."""
    from morphmlp.config import load_yaml

    name = os.path.splitext(os.path.basename(variant))[0]
    path = os.path.join(RECIPES_DIR, f"{name}.yaml")
    return load_yaml(path) if os.path.exists(path) else {}


def resolve_config(user_tree: dict[str, Any]) -> TrainJobConfig:
    """Defaults → variant recipe → user tree, with the data's frames and crop size taken from
    the model (one source of truth: set them with model.num_frames / model.img_size)."""
    variant = user_tree.get("model", {}).get("variant", ModelSection.variant)
    tree = merge(recipe_for(variant), user_tree)
    model = tree.get("model", {})
    arch = architecture(variant)  # raises ConfigError listing the valid variants
    frames = model.get("num_frames") or arch.num_frames
    size = model.get("img_size") or arch.img_size
    derived = {"num_frames": frames, "train_crop_size": size, "test_crop_size": size}
    data = tree.get("data", {})
    for key, want in derived.items():
        if key in data and data[key] != want:
            raise ConfigError(
                f"data.{key}={data[key]} conflicts with the model's {want}: set "
                "model.num_frames / model.img_size (--frames / --img-size) instead"
            )
    tree = merge(tree, {"model": {"num_frames": frames, "img_size": size}, "data": derived})
    return from_dict(TrainJobConfig, tree)


def architecture(variant: str, **overrides: Any):
    """MorphMLPConfig of a named variant or of a variant YAML written by the search."""
    from morphmlp.models import load_variant_file, variant_config

    if variant.endswith((".yaml", ".yml")):
        base = load_variant_file(variant)
        return variant_config("s", **{**to_dict(base), **overrides}) if overrides else base
    return variant_config(variant, **overrides)


def steps_per_epoch(num_train_videos: int, cfg: TrainJobConfig) -> int:
    """Optimizer steps per epoch; the remainder of each epoch is dropped (drop_last)."""
    steps = num_train_videos // cfg.global_batch
    if steps < 1:
        raise ConfigError(
            f"the training split has {num_train_videos} videos, fewer than one global batch of "
            f"{cfg.global_batch} (batch_size {cfg.optim.batch_size} × workers "
            f"{cfg.scaling.workers} × grad_accum_steps {cfg.optim.grad_accum_steps})"
        )
    return steps


def warmup_steps(cfg: TrainJobConfig, steps_per_epoch: int) -> int:
    return math.ceil(cfg.optim.warmup_epochs * steps_per_epoch)


def default_run_name(cfg: TrainJobConfig, dataset_name: str) -> str:
    variant = os.path.splitext(os.path.basename(cfg.model.variant))[0]
    return f"{variant}-{cfg.model.num_frames}x{cfg.model.img_size}-{dataset_name}"


def as_tree(cfg: TrainJobConfig) -> dict[str, Any]:
    return to_dict(cfg)


def _positive(obj: Any, *names: str) -> None:
    section = type(obj).__name__.replace("Config", "").replace("Section", "").lower()
    for name in names:
        value = getattr(obj, name)
        if value <= 0:
            raise ConfigError(f"{section}.{name}={value} must be > 0")
