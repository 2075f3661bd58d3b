"""Train MorphMLP on Ray Train, tracked in MLflow.

    python jobs/train.py                                   # xs on the built-in demo videos
    ray job submit -- python jobs/train.py --variant b --dataset s3://bucket/k400/index.parquet --workers 16 --gpus-per-worker 1 --storage s3://bucket/runs

Settings resolve as: the variant's recipe → --config YAML → flags (→ --set key=value). A flag's
value is taken as typed (`--name 007` is the run "007"); YAML is parsed only in --config files
and --set values. --print-config prints the resolved config and exits.
Re-running the same command resumes the run from its latest checkpoint.
"""

from __future__ import annotations

import argparse
import logging
import sys

from morphmlp.config import set_key
from morphmlp.errors import MorphMLPError
from morphmlp.train.config import FLAGS, add_flags, tree_from_cli


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--config", help="YAML file setting any config field")
    add_flags(parser, FLAGS)
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
    parser.add_argument(
        "--print-config",
        action="store_true",
        help="print the resolved config as YAML and exit (starts no Ray, opens no MLflow)",
    )
    return parser.parse_args(argv)


def config_tree(args: argparse.Namespace) -> dict:
    flags = {flag: getattr(args, flag) for flag in FLAGS}
    tree = tree_from_cli(args.config, flags, args.set)
    for key, value in (("compile", args.compile), ("grad_checkpointing", args.grad_checkpointing)):
        if value is not None:
            tree = set_key(tree, f"model.{key}", value)
    return tree


def main(argv: list[str] | None = None) -> int:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s", datefmt="%H:%M:%S")
    args = parse_args(argv)
    from morphmlp.config import to_yaml
    from morphmlp.train.config import resolve_config

    try:
        cfg = resolve_config(config_tree(args))
        if args.print_config:
            print(to_yaml(cfg), end="")
            return 0
        from morphmlp.cluster import connect_ray
        from morphmlp.train.driver import prepare, run_training

        plan = prepare(cfg, resume=args.resume)
        connect_ray(args.address)
        print(f"Checkpoints: {plan.run_dir}", flush=True)
        outcome = run_training(plan)
    except MorphMLPError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    from morphmlp import tracking

    p = outcome.progress
    done = "Already finished" if outcome.already_finished else "Done"
    print(
        f"\n{done}: {p.epoch} epochs, best val top-1 {100 * p.best_top1:.2f}% "
        f"(epoch {p.best_epoch})"
    )
    print(f"Checkpoints:  {outcome.run_dir}")
    print(f"Best model:   {outcome.best_model_uri}")
    if outcome.mlflow_run_id and not outcome.already_finished:
        versions = ", ".join(f"{k} v{v}" for k, v in outcome.model_versions.items())
        print(f"MLflow run:   {outcome.mlflow_run_id} ({tracking.tracking_uri()})")
        print(f"Registered:   {tracking.REGISTERED_MODEL}: {versions or 'none'}")
        print(f"MLflow UI:    {tracking.ui_hint()}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
