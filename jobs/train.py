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

from morphmlp.errors import MorphMLPError
from morphmlp.train.config import FLAGS, tree_from_cli


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
    flags = {flag: getattr(args, flag) for flag in FLAGS}
    tree = tree_from_cli(args.config, flags, args.set)
    for key, value in (("compile", args.compile), ("grad_checkpointing", args.grad_checkpointing)):
        if value is not None:
            tree.setdefault("model", {})[key] = value
    return tree


def main(argv: list[str] | None = None) -> int:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s", datefmt="%H:%M:%S")
    args = parse_args(argv)
    from morphmlp import tracking
    from morphmlp.cluster import connect_ray
    from morphmlp.train.config import resolve_config
    from morphmlp.train.trainer import prepare, run_training

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
