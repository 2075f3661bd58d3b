"""Re-encode an indexed dataset on Ray for cheap decoding: short side N, a keyframe every K frames.

    python jobs/transcode.py --index videos/index.parquet --out videos-320/
    ray job submit -- python jobs/transcode.py --index s3://bucket/k400/index.parquet --out s3://bucket/k400-320/

Writes H.264 yuv420p mp4s under --out (each appears whole or not at all), a new index
<out>/index.parquet (same labels, splits, class names and clip windows; probed metadata of the new
files) and <out>/index.rejects.csv (videos that could not be read, with the reason). Re-running
with the same arguments skips the videos already done. Train on the new index with --dataset.
Details: morphmlp/data/transcode.py.
"""

from __future__ import annotations

import argparse
import logging
import sys

from morphmlp.errors import MorphMLPError


class _OneLineParser(argparse.ArgumentParser):
    """Bad arguments give one line (`error: ...`) and exit 2, like every other bad input."""

    def error(self, message: str):
        self.exit(2, f"error: {message}\n")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = _OneLineParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--index", required=True, help="source index URI (.parquet)")
    parser.add_argument("--out", required=True, help="destination folder URI (local or s3://)")
    parser.add_argument(
        "--short-side", type=int, default=320, help="short side of the outputs (default 320)"
    )
    parser.add_argument(
        "--keyframe-interval",
        type=int,
        default=16,
        help="frames between keyframes (default 16; 0 = x264's default spacing)",
    )
    parser.add_argument("--crf", type=int, default=23, help="x264 quality (default 23)")
    parser.add_argument("--preset", default="medium", help="x264 preset (default medium)")
    parser.add_argument(
        "--cpus-per-task", type=float, default=1.0, help="CPUs per video task (default 1)"
    )
    parser.add_argument("--address", help="Ray cluster address (default: RAY_ADDRESS or local)")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s", datefmt="%H:%M:%S")
    args = parse_args(argv)
    from morphmlp import storage
    from morphmlp.cluster import ray_session
    from morphmlp.data.transcode import TranscodeConfig, plan_transcode, run_transcode

    try:
        cfg = TranscodeConfig(
            short_side=args.short_side,
            keyframe_interval=args.keyframe_interval,
            crf=args.crf,
            preset=args.preset,
            cpus_per_task=args.cpus_per_task,
        )
        # Destination, source index and output names are checked before Ray starts.
        plan = plan_transcode(args.index, args.out, cfg)
        with ray_session(args.address):
            result = run_transcode(plan)
    except MorphMLPError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    print(
        f"Index: {storage.redact(result.index_uri)} ({result.rows} rows; {result.encoded} videos "
        f"encoded, {result.skipped} already done, {result.rejected} rejected -> "
        f"{storage.redact(result.rejects_uri)})"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
