"""The training job's configuration: one typed tree, resolved once, never changed afterwards.

Precedence, lowest to highest: dataclass defaults (the release's Kinetics-400 recipe) → the
variant's recipe file (recipes/<variant>.yaml, e.g. the demo recipe for `xs`; logged when
applied) → a user YAML (`--config`) → the jobs' typed flags (set as given, never re-parsed) →
`--set key=value` (YAML values). The resolved tree is what every worker receives and what MLflow
records; what the driver works out from it (absolute storage root, run name and folder) lives in
its TrainPlan.
"""

from __future__ import annotations

import argparse
import logging
import os
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any, Literal

from morphmlp.config import (
    ConfigError,
    apply_overrides,
    check,
    check_at_least,
    check_positive,
    check_range,
    from_dict,
    load_yaml,
    merge,
    set_key,
)
from morphmlp.data.config import DataConfig

RECIPES_DIR = os.path.join(os.path.dirname(__file__), "recipes")

log = logging.getLogger("morphmlp.train")


@dataclass
class ModelConfig:
    variant: str = "xs"  # registered name (xs, s, b, ...) or a variant YAML written by the search
    num_frames: int | None = None  # None: the variant's default (xs 8, s/b 16)
    img_size: int | None = None  # None: the variant's default (xs 112, s/b 224)
    drop_path_rate: float | None = None  # None: the release's (0.1 for s, 0.3 for b)
    pretrained: str | None = None  # image checkpoint (inflated) or a release/our checkpoint
    grad_checkpointing: bool = False
    compile: bool = False

    def factory_kwargs(self) -> dict[str, Any]:
        """`models.factory.create_model`'s arguments for this section (None: the variant's);
        `pretrained` is the caller's to pass (the driver's check builds no weights)."""
        return {
            "num_frames": self.num_frames,
            "img_size": self.img_size,
            "drop_path_rate": self.drop_path_rate,
            "grad_checkpointing": self.grad_checkpointing,
        }


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
        check_positive(
            "optim", self, "epochs", "batch_size", "grad_accum_steps", "lr", "lr_reference_batch"
        )
        check_range("optim", self, "warmup_epochs", 0, self.epochs)
        check_range("optim", self, "label_smoothing", 0, 1, high_open=True)
        clip = self.clip_grad_norm
        check("optim", self, "clip_grad_norm", clip is None or clip > 0, "> 0 or null")


@dataclass
class ScalingConfig:
    workers: int = 1
    gpus_per_worker: float = 0.0
    cpus_per_worker: float = 1.0  # keep low on small machines: Ray Data decodes on the rest
    max_failures: int = 3  # worker/node failures survived by restarting from the checkpoint
    # With an autoscaler, how long to wait for the nodes the request needs before giving up
    # (without one, a request the cluster can't meet is refused at once).
    resource_wait_s: float = 600.0

    def __post_init__(self) -> None:
        check_positive("scaling", self, "workers")
        check_at_least(
            "scaling",
            self,
            0,
            "gpus_per_worker",
            "cpus_per_worker",
            "max_failures",
            "resource_wait_s",
        )


@dataclass
class RunConfig:
    name: str | None = None  # None: derived from variant, frames and dataset (re-running resumes)
    storage: str = "runs"  # local path or URI (s3://bucket/prefix) for checkpoints
    experiment: str = "morphmlp-train"
    seed: int = 0
    checkpoint_every_steps: int = 0  # 0: only at epoch ends
    keep_last: int = 2  # checkpoints kept for resume; the best by val top-1 is kept apart
    log_every_steps: int = 10
    register_model: bool = True  # register best and final as versions of `morphmlp` in MLflow

    def __post_init__(self) -> None:
        check_positive("run", self, "keep_last", "log_every_steps")
        check_at_least("run", self, 0, "checkpoint_every_steps")


@dataclass
class TrainJobConfig:
    dataset: str = "demo"  # index URI (Parquet) or `demo` for the built-in dataset
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    scaling: ScalingConfig = field(default_factory=ScalingConfig)
    run: RunConfig = field(default_factory=RunConfig)

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


def add_flags(
    parser: argparse.ArgumentParser, names: Iterable[str], help: Mapping[str, str] | None = None
) -> None:
    """Add the FLAGS `names` to a job's parser, typed; `help` replaces a flag's text."""
    for flag in names:
        key, typ, text = FLAGS[flag]
        text = (help or {}).get(flag, text)
        parser.add_argument(f"--{flag.replace('_', '-')}", type=typ, help=f"{text} [{key}]")


def tree_from_cli(config: str | None, flags: dict[str, Any], sets: list[str]) -> dict[str, Any]:
    """The user's config tree: the --config YAML, then the flags (by FLAGS name, their typed
    values set as given; None = not given), then the --set KEY=VALUE overrides (YAML values)."""
    tree = load_yaml(config) if config else {}
    for flag, value in flags.items():
        if value is not None:
            tree = set_key(tree, FLAGS[flag][0], value)
    return apply_overrides(tree, sets)


def recipe_path(variant: str) -> str | None:
    """The variant's own recipe file (e.g. the demo recipe for xs), if it has one."""
    name = os.path.splitext(os.path.basename(variant))[0]
    path = os.path.join(RECIPES_DIR, f"{name}.yaml")
    return path if os.path.exists(path) else None


def resolve_config(user_tree: dict[str, Any]) -> TrainJobConfig:
    """Defaults → variant recipe → user tree, with the data's frames and crop size taken from
    the model (one source of truth: set them with model.num_frames / model.img_size)."""
    from morphmlp.models.factory import model_config

    variant = user_tree.get("model", {}).get("variant", ModelConfig.variant)
    arch = model_config(variant) if isinstance(variant, str) else None  # names valid variants
    recipe = recipe_path(variant) if isinstance(variant, str) else None
    if recipe:
        log.info("Recipe applied: %s (--config, flags and --set override it)", recipe)
    tree = merge(load_yaml(recipe) if recipe else {}, user_tree)
    model = tree.get("model", {})
    if arch is None:  # not a string: from_dict names the key and the value
        return from_dict(TrainJobConfig, tree)
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


def default_run_name(cfg: TrainJobConfig, dataset_name: str) -> str:
    variant = os.path.splitext(os.path.basename(cfg.model.variant))[0]
    return f"{variant}-{cfg.model.num_frames}x{cfg.model.img_size}-{dataset_name}"
