r"""Search MorphMLP architectures with Ray Tune: every trial is a Ray Train run, ASHA stops the
laggards, the result is a Pareto front of (GMACs, val top-1) and the best variant file.

    python jobs/tune.py --trials 4 --epochs 3              # the default space, demo videos
    ray job submit -- python jobs/tune.py --space my_space.yaml --dataset s3://b/k400.parquet --trials 32 --epochs 30 --workers 4 --gpus-per-worker 1 --storage s3://b/searches --objective top1-under-gmacs --gmacs-budget 40

Training settings resolve as for jobs/train.py (the space's variant recipe → --config → flags →
--set; a flag's value is taken as typed); the search space decides the architecture.
--print-config prints the resolved search and base training config and exits. Under a GMACs budget, drawn configurations
over it are rejected before anything trains. Re-running the same --name resumes the search
(exit code 130 when it was interrupted). Then train the best configuration:
    python jobs/train.py --variant <storage>/<name>/best.yaml --config <...>/best_config.yaml
"""

from __future__ import annotations

import argparse
import logging
import sys

from morphmlp.errors import MorphMLPError
from morphmlp.train.config import add_flags, tree_from_cli
from morphmlp.tune.space import DEFAULT_SPACE

# training flags every trial shares (the search space decides the architecture)
TRAIN_FLAGS = ("dataset", "epochs", "workers", "gpus_per_worker", "cpus_per_worker", "storage")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--space", default=DEFAULT_SPACE, help="search-space YAML")
    parser.add_argument("--trials", type=int, default=8, help="random draws (x each grid point)")
    parser.add_argument(
        "--max-concurrent", type=int, help="trials at once (default: what the cluster fits)"
    )
    parser.add_argument("--objective", choices=["top1", "top1-under-gmacs"], default="top1")
    parser.add_argument(
        "--gmacs-budget",
        type=float,
        help="with top1-under-gmacs: drawn configurations over it are rejected before training",
    )
    parser.add_argument("--grace-epochs", type=int, default=1, help="ASHA: epochs before a stop")
    parser.add_argument(
        "--reduction-factor", type=float, default=2.0, help="ASHA: keep 1/rf at each rung"
    )
    parser.add_argument("--name", help="search name (default: tune-<space>-<dataset>)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the search-space draws")
    parser.add_argument("--config", help="training YAML every trial starts from")
    add_flags(parser, TRAIN_FLAGS, help={"epochs": "epochs per trial: ASHA's max_t"})
    parser.add_argument(
        "--set",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="override a training config field, e.g. --set optim.batch_size=4",
    )
    parser.add_argument("--address", help="Ray cluster address (default: RAY_ADDRESS or local)")
    parser.add_argument(
        "--print-config",
        action="store_true",
        help="print the resolved search and base training config as YAML and exit "
        "(starts no Ray, opens no MLflow)",
    )
    return parser.parse_args(argv)


def train_tree(args: argparse.Namespace) -> dict:
    return tree_from_cli(args.config, {flag: getattr(args, flag) for flag in TRAIN_FLAGS}, args.set)


def main(argv: list[str] | None = None) -> int:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s", datefmt="%H:%M:%S")
    args = parse_args(argv)
    from morphmlp import storage, tracking
    from morphmlp.config import to_yaml
    from morphmlp.tune.search import (
        SearchConfig,
        SearchInterrupted,
        base_config,
        prepare_search,
        run_search,
    )

    try:
        search = SearchConfig(
            space=args.space,
            trials=args.trials,
            max_concurrent=args.max_concurrent,
            objective=args.objective,
            gmacs_budget=args.gmacs_budget,
            grace_epochs=args.grace_epochs,
            reduction_factor=args.reduction_factor,
            name=args.name,
            seed=args.seed,
        )
        if args.print_config:
            _, base = base_config(search, train_tree(args))
            print(to_yaml({"search": search, "train": base}), end="")
            return 0
        prep = prepare_search(search, train_tree(args))
        print(f"Search {prep.name}: {len(prep.trials)} trials in {prep.root}", flush=True)
        outcome = run_search(prep, address=args.address)
    except SearchInterrupted as err:
        print(f"interrupted: {err}", file=sys.stderr)
        return 130
    except MorphMLPError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    print("\n" + storage.read_bytes(outcome.report_files[1]).decode())
    if outcome.best is not None:
        b = outcome.best
        print(f"Best: {b.name}, val top-1 {100 * b.top1:.2f}% at {b.gmacs:.3f} GMACs")
        print(f"Best variant: {outcome.best_variant}  (jobs/train.py --variant ...)")
        print(f"Best config:  {outcome.best_config}  (jobs/train.py --config ...)")
    print(f"Report:       {', '.join(outcome.report_files)}")
    if outcome.parent_run_id:
        print(f"MLflow run:   {outcome.parent_run_id} ({tracking.tracking_uri()})")
        print(f"MLflow UI:    {tracking.ui_hint()}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
