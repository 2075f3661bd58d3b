"""Evaluate one checkpoint on one benchmark with the release's multi-view protocol, on Ray.

    python jobs/evaluate.py models:/morphmlp/3 --benchmark demo-val
    python jobs/evaluate.py --model-version 3 --benchmark demo-val-4x3
    python jobs/evaluate.py runs:/<run_id> --index s3://bucket/k400/index.parquet --split val --clips 4 --crops 3                                      # Kinetics: 4 clips x 3 crops
    python jobs/evaluate.py K400_MorphMLP_S16.pth --variant s --frames 16 --index k400/index.parquet --split val --clips 4 --crops 3 --ensemble logits

Checkpoint: models:/morphmlp/<version>, runs:/<run_id>[/<artifact path>] (default: the run's
best model), or a path/URI of a model.pt (ours) or a release checkpoint (give --variant, --frames).
Benchmark: a catalog entry (--benchmark, from --catalog) or an index URI with protocol flags.
The result is an MLflow run in experiment morphmlp-eval: top-1, top-5, mean class accuracy,
per-class accuracy, confusion matrix (PNG), per-video predictions (Parquet).
Exit code: 0 done, 2 bad input (one line on stderr naming the problem).
"""

from __future__ import annotations

import argparse
import logging
import sys

from morphmlp.errors import ConfigError, MorphMLPError

DEFAULT_CATALOG = "benchmarks/catalog.yaml"


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("checkpoint", nargs="?", help="checkpoint reference (see above)")
    parser.add_argument("--model-version", help="registered version of morphmlp to evaluate")
    parser.add_argument("--variant", help="release checkpoints: xs, s or b")
    parser.add_argument("--frames", type=int, help="release checkpoints: input frames")
    parser.add_argument("--img-size", type=int, help="release checkpoints: input size")
    bench = parser.add_argument_group("benchmark")
    bench.add_argument("--benchmark", help="name of a catalog entry")
    bench.add_argument("--catalog", default=DEFAULT_CATALOG, help="catalog YAML (path or URI)")
    bench.add_argument("--index", help="an index URI instead of a catalog entry")
    bench.add_argument("--split", help="with --index: evaluate only this split")
    proto = parser.add_argument_group("protocol (with --index)")
    proto.add_argument("--clips", type=int, help="temporal clips per video (default 1)")
    proto.add_argument("--crops", type=int, help="spatial crops per clip: 1 or 3 (default 1)")
    proto.add_argument("--sampling", help="dense (Kinetics, default) or segment (SSv2)")
    proto.add_argument("--sampling-rate", type=int, help="dense: frame stride (default: trained)")
    proto.add_argument("--ensemble", help="softmax (default) or logits: how views are averaged")
    run = parser.add_argument_group("resources")
    run.add_argument("--batch-size", type=int, help="views per forward pass (default 8)")
    run.add_argument("--model-actors", type=int, help="model actors (default 1)")
    run.add_argument("--gpus-per-actor", type=float, help="default: 1 if the cluster has GPUs")
    run.add_argument("--decode-actors", type=int, help="max decode actors")
    parser.add_argument("--output", help="also write the reports to this folder (path or URI)")
    parser.add_argument("--address", help="Ray cluster address (default: RAY_ADDRESS or local)")
    return parser.parse_args(argv)


def benchmark_spec(args: argparse.Namespace):
    from morphmlp.config import from_dict
    from morphmlp.evaluate.catalog import Protocol, index_benchmark, load_catalog

    flags = {
        "clips": args.clips,
        "crops": args.crops,
        "sampling": args.sampling,
        "sampling_rate": args.sampling_rate,
        "ensemble": args.ensemble,
    }
    given = {k: v for k, v in flags.items() if v is not None}
    if (args.benchmark is None) == (args.index is None):
        raise ConfigError("give exactly one of --benchmark (a catalog entry) and --index")
    if args.benchmark is not None:
        extra = [f"--{k.replace('_', '-')}" for k in given] + (["--split"] if args.split else [])
        if extra:
            raise ConfigError(
                f"{', '.join(extra)} apply to --index; catalog entry {args.benchmark!r} brings "
                "its own split and protocol"
            )
        return load_catalog(args.catalog).get(args.benchmark)
    return index_benchmark(
        args.index, split=args.split, protocol=from_dict(Protocol, given, where="protocol")
    )


def eval_config(args: argparse.Namespace):
    from morphmlp.evaluate.multiview import EvalConfig

    settings = {}
    if args.batch_size is not None:
        settings["batch_size"] = args.batch_size
    if args.model_actors is not None:
        settings["model_actors"] = (1, args.model_actors)
    if args.gpus_per_actor is not None:
        settings["gpus_per_model_actor"] = args.gpus_per_actor
    if args.decode_actors is not None:
        settings["decode_actors"] = (1, args.decode_actors)
    return EvalConfig(**settings)


def main(argv: list[str] | None = None) -> int:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s", datefmt="%H:%M:%S")
    args = parse_args(argv)
    from morphmlp import tracking
    from morphmlp.cluster import connect_ray
    from morphmlp.evaluate import model_refs
    from morphmlp.evaluate.catalog import resolve_benchmark
    from morphmlp.evaluate.runner import evaluate_pair, plan_pair

    try:
        if (args.checkpoint is None) == (args.model_version is None):
            raise ConfigError("give exactly one of a checkpoint reference and --model-version")
        reference = args.checkpoint or model_refs.model_version_uri(args.model_version)
        spec = benchmark_spec(args)
        cfg = eval_config(args)
        tracking.check_reachable(tracking.tracking_uri())
        bench = resolve_benchmark(spec)
        ckpt = model_refs.load(
            reference, variant=args.variant, frames=args.frames, img_size=args.img_size
        )
        plan = plan_pair(ckpt, bench, cfg)
        connect_ray(args.address)
        outcome = evaluate_pair(plan, cfg, output=args.output)
    except MorphMLPError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    m = outcome.metrics
    print(
        f"\n{ckpt.describe()} on {bench.name} ({spec.protocol.describe()}, {m.num_videos} videos)"
    )
    print(
        f"top-1 {100 * m.top1:.2f}%  top-5 {100 * m.top5:.2f}%  mean class {100 * m.mean_class_accuracy:.2f}%"
    )
    print(f"labels: {plan.label_map.describe()}")
    if outcome.num_bad_videos:
        print(f"skipped {outcome.num_bad_videos} unreadable videos (bad_data.csv in the run)")
    print(f"MLflow run: {outcome.run_id} ({tracking.ui_hint()})")
    if args.output:
        print(f"reports: {args.output}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
