"""Train MorphMLP on Ray Train, tracked in MLflow.

    python jobs/train.py                                   # xs on the built-in demo videos
    ray job submit -- python jobs/train.py --variant b --dataset s3://bucket/k400/index.parquet \
        --workers 16 --gpus-per-worker 1 --storage s3://bucket/runs

Settings resolve as: the variant's recipe → --config YAML → flags (→ --set key=value).
Re-running the same command resumes the run from its latest checkpoint.
"""

from __future__ import annotations

import argparse
import logging
import sys

from morphmlp.config import apply_overrides, load_yaml, merge
from morphmlp.errors import MorphMLPError

# flag → dotted config key; each flag overrides the YAML config
FLAGS = {
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
    "storage": ("run.storage", str, "where checkpoints go: a path or s3://bucket/prefix"),
    "name": ("run.name", str, "run name (default: <variant>-<frames>x<size>-<dataset>)"),
    "experiment": ("run.experiment", str, "MLflow experiment"),
    "seed": ("run.seed", int, "random seed"),
}


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--config", help="YAML file setting any config field")
    for flag, (key, typ, text) in FLAGS.items():
        parser.add_argument(f"--{flag.replace('_', '-')}", type=typ, help=f"{text} [{key}]")
    parser.add_argument(
        "--grad-checkpointing",
        action="store_true",
        default=None,
        help="recompute activations in backward to save memory",
    )
    parser.add_argument("--compile", action="store_true", default=None, help="torch.compile")
    parser.add_argument(
        "--set",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="override any config field, e.g. --set optim.warmup_epochs=5",
    )
    parser.add_argument(
        "--resume",
        choices=["auto", "must", "never"],
        default="auto",
        help="auto: continue a run of the same name if it exists (default); "
        "must: fail if there is none; never: fail if there is one",
    )
    parser.add_argument("--address", help="Ray cluster address (default: RAY_ADDRESS or local)")
    return parser.parse_args(argv)


def config_tree(args: argparse.Namespace) -> dict:
    tree = load_yaml(args.config) if args.config else {}
    flags = {key: getattr(args, flag) for flag, (key, _, _) in FLAGS.items()}
    flags["model.grad_checkpointing"] = args.grad_checkpointing
    flags["model.compile"] = args.compile
    given = [f"{key}={value}" for key, value in flags.items() if value is not None]
    return apply_overrides(merge(tree, apply_overrides({}, given)), args.set)


def main(argv: list[str] | None = None) -> int:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s", datefmt="%H:%M:%S")
    args = parse_args(argv)
    from morphmlp import tracking
    from morphmlp.train.config import resolve_config
    from morphmlp.train.trainer import connect_ray, prepare, run_training

    try:
        prep = prepare(resolve_config(config_tree(args)), resume=args.resume)
        connect_ray(args.address)
        print(f"Checkpoints: {prep.run_dir}", flush=True)
        outcome = run_training(prep)
    except MorphMLPError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    p = outcome.progress
    print(
        f"\nDone: {p.epoch} epochs, best val top-1 {100 * p.best_top1:.2f}% (epoch {p.best_epoch})"
    )
    print(f"Checkpoints:  {outcome.run_dir}")
    print(f"Best model:   {outcome.best_model_uri}")
    if outcome.mlflow_run_id:
        versions = ", ".join(f"{k} v{v}" for k, v in outcome.model_versions.items())
        print(f"MLflow run:   {outcome.mlflow_run_id} ({tracking.tracking_uri()})")
        print(f"Registered:   {tracking.REGISTERED_MODEL}: {versions or 'none'}")
        print(f"MLflow UI:    {tracking.ui_hint()}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
