"""Predict the classes of videos with a trained MorphMLP (a checkpoint or an exported file).

Examples:
  python jobs/predict.py clip.mp4 --model models:/morphmlp@best
  python jobs/predict.py clip.mp4 --model models:/morphmlp/3 --clips 4 --crops 3 --top-k 3
  python jobs/predict.py videos/ --model runs:/<run_id> --output predictions.csv
  python jobs/predict.py s3://bucket/k400/index.parquet --model model.pt --output preds.parquet
  python jobs/predict.py a.mp4 b.webm --model export/model.onnx

--model: a model.pt file (path or URI), runs:/<run_id>[/<artifact path>],
models:/morphmlp/<version>, models:/morphmlp/latest (the newest version),
models:/morphmlp@<alias> (best, newest, champion), or a file
jobs/export.py wrote (model.pt2 or model.onnx, with its sidecar <file>.json beside it).
VIDEO: a video file (path or URI), a folder (its videos, recursively) or a Parquet index.
The protocol is the checkpoint's own (frames, crop size, sampling, rate, short side, views)
unless --clips, --crops, --sampling-rate or --short-side say otherwise. One video runs here;
several run on Ray (local, or --address / RAY_ADDRESS) with progress and an ETA.
Exit code: 0 all predicted, 1 some videos could not be read (one line each), 2 bad input.
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
    parser.add_argument("videos", nargs="+", metavar="VIDEO", help="video, folder or index")
    parser.add_argument("--model", required=True, help="model reference (see above)")
    parser.add_argument("--top-k", type=int, default=5, help="classes shown per video")
    parser.add_argument("--variant", help="release checkpoints: xs, s or b")
    parser.add_argument("--frames", type=int, help="release checkpoints: input frames")
    parser.add_argument("--img-size", type=int, help="release checkpoints: input size")
    view = parser.add_argument_group("protocol (default: the checkpoint's)")
    view.add_argument("--clips", type=int, help="temporal clips per video")
    view.add_argument("--crops", type=int, help="spatial crops per clip: 1 or 3")
    view.add_argument("--sampling-rate", type=int, help="dense sampling: frame stride")
    view.add_argument("--short-side", type=int, help="short side before cropping")
    run = parser.add_argument_group("resources (several videos)")
    run.add_argument("--batch-size", type=int, help="views per forward pass (default 8)")
    run.add_argument("--model-actors", type=int, help="model actors (default 1)")
    run.add_argument("--decode-actors", type=int, help="max decode actors")
    parser.add_argument("--output", help="also write the predictions to FILE.csv or .parquet")
    parser.add_argument("--address", help="Ray cluster address (default: RAY_ADDRESS or local)")
    return parser.parse_args(argv)


def predict_config(args: argparse.Namespace):
    from morphmlp.evaluate.multiview import EvalConfig
    from morphmlp.evaluate.predict import PredictConfig

    resources = {}
    if args.batch_size is not None:
        resources["batch_size"] = args.batch_size
    if args.model_actors is not None:
        resources["model_actors"] = (1, args.model_actors)
    if args.decode_actors is not None:
        resources["decode_actors"] = (1, args.decode_actors)
    return PredictConfig(
        clips=args.clips,
        crops=args.crops,
        sampling_rate=args.sampling_rate,
        short_side=args.short_side,
        top_k=args.top_k,
        eval=EvalConfig(**resources),
    )


def main(argv: list[str] | None = None) -> int:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s", datefmt="%H:%M:%S")
    args = parse_args(argv)
    from morphmlp import tracking
    from morphmlp.evaluate import predict

    try:
        cfg = predict_config(args)
        predict.check_output(args.output)
        videos = predict.collect_videos(args.videos)
        if args.model.startswith(("models:/", "runs:/")):
            tracking.check_reachable(tracking.tracking_uri())
        model = predict.load_model(
            args.model, variant=args.variant, frames=args.frames, img_size=args.img_size
        )
        data_cfg = predict.data_config(model, cfg)
        predict.check_output(args.output, writable=True)
        if len(videos) > 1:
            from morphmlp.cluster import connect_ray

            connect_ray(args.address)
        predictions = predict.predict(videos, model, data_cfg, cfg)
    except MorphMLPError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    failed = [p for p in predictions if not p.ok]
    for p in failed:
        print(f"failed: {p.video}: {p.error}", file=sys.stderr)
    views = f"{data_cfg.test_num_clips}x{data_cfg.test_num_crops} views"
    print(f"{model.describe()}, {views}")
    table = predict.format_predictions(predictions, cfg.top_k)
    if table:
        print(table)
    if args.output:
        predict.write_predictions(predictions, args.output, cfg.top_k)
        print(f"predictions: {args.output}")
    if failed:
        print(f"{len(failed)} of {len(predictions)} videos could not be read", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
