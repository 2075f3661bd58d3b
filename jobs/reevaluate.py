"""Score every registered model version on every catalog benchmark it has no result for yet.

    python jobs/reevaluate.py                                   # benchmarks/catalog.yaml
    ray job submit --working-dir . -- python jobs/reevaluate.py --catalog s3://bucket/benchmarks.yaml --output s3://bucket/leaderboard

A result counts for the benchmark's current content hash and protocol only: a changed benchmark
is re-run, an unchanged one never is. Killed midway, a re-run finishes only what is missing.
Writes leaderboard.md and leaderboard.html to --output and, when it changed, to MLflow
(experiment morphmlp-eval, run "leaderboard").

Exit code: 0 when every pair is scored, up to date, or skipped/reported for a known reason (no
shared class, frames the network isn't built for, a benchmark whose hash no longer matches, a
checkpoint that can't be loaded: one line each); 1 when some pair failed unexpectedly (traceback
in the log; the other pairs still ran); 2 when the job could not start (bad catalog or flags,
MLflow unreachable).
"""

from __future__ import annotations

import argparse
import logging
import sys

from morphmlp.errors import MorphMLPError


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--catalog", default="benchmarks/catalog.yaml", help="path or URI")
    parser.add_argument(
        "--output", default="leaderboard", help="folder (path or URI) for the leaderboard files"
    )
    parser.add_argument(
        "--versions", nargs="+", metavar="N", help="only these registered versions (default: all)"
    )
    parser.add_argument(
        "--promote",
        metavar="BENCHMARK",
        help="afterwards, move the registry alias `champion` to the version with the best "
        "top-1 on this catalog benchmark",
    )
    parser.add_argument(
        "--list",
        action="store_true",
        help="print the catalog's benchmarks with their current content hashes, then exit",
    )
    parser.add_argument("--batch-size", type=int, default=8, help="views per forward pass")
    parser.add_argument("--model-actors", type=int, default=1, help="model actors per pair")
    parser.add_argument("--gpus-per-actor", type=float, help="default: 1 if the cluster has GPUs")
    parser.add_argument("--address", help="Ray cluster address (default: RAY_ADDRESS or local)")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s", datefmt="%H:%M:%S")
    args = parse_args(argv)
    from morphmlp import tracking
    from morphmlp.evaluate.catalog import load_catalog, resolve_benchmark
    from morphmlp.evaluate.multiview import EvalConfig
    from morphmlp.evaluate.schedule import check_promotable, promote, reevaluate

    try:
        catalog = load_catalog(args.catalog)
        if args.list:
            for spec in catalog.benchmarks:
                try:
                    bench = resolve_benchmark(spec)
                except MorphMLPError as err:
                    print(f"{spec.name}: {err}")
                    continue
                print(
                    f"{bench.name}: {len(bench.index)} videos, {len(bench.class_names)} classes, "
                    f"{spec.protocol.describe()}, content_hash {bench.content_hash}, "
                    f"protocol_hash {bench.protocol_hash}"
                )
            return 0
        cfg = EvalConfig(
            batch_size=args.batch_size,
            model_actors=(1, args.model_actors),
            gpus_per_model_actor=args.gpus_per_actor,
        )
        if args.promote:
            check_promotable(catalog, args.promote)
        tracking.check_reachable(tracking.tracking_uri())
        report = reevaluate(
            catalog, output=args.output, cfg=cfg, versions=args.versions, address=args.address
        )
        champion = promote(catalog, args.promote) if args.promote else None
    except MorphMLPError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    for title, lines in (
        ("evaluated", report.evaluated),
        ("skipped (recorded)", report.skipped),
        ("not evaluated", report.reported),
        ("FAILED", report.failed),
    ):
        for line in lines:
            print(f"{title}: {line}")
    if report.did_nothing:
        print(f"nothing to do: {report.up_to_date} pairs already have results")
    else:
        print(
            f"done: {len(report.evaluated)} evaluated, {len(report.skipped)} skipped, "
            f"{len(report.failed)} failed, {report.up_to_date} already up to date"
        )
    print(
        f"leaderboard: {args.output} ({'updated in MLflow' if report.leaderboard_logged else 'unchanged in MLflow'})"
    )
    if champion:
        version, top1 = champion
        print(
            f"champion: {tracking.REGISTERED_MODEL}@{tracking.ALIAS_CHAMPION} -> v{version} "
            f"(top-1 {100 * top1:.1f}% on {args.promote})"
        )
    return 1 if report.failed else 0


if __name__ == "__main__":
    sys.exit(main())
