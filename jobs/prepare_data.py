"""Build a video index (Parquet) from dataset annotations, probing every video on Ray.

    python jobs/prepare_data.py --from-folder videos/ --out videos/index.parquet
    python jobs/prepare_data.py --from-kinetics-csv k400/train.csv k400/val.csv --video-root s3://bucket/k400/videos --out s3://bucket/k400/index.parquet
    python jobs/prepare_data.py --from-ssv2 ssv2/something-something-v2-train.json ssv2/something-something-v2-validation.json --labels ssv2/something-something-v2-labels.json --video-root s3://bucket/ssv2/videos --out s3://bucket/ssv2/index.parquet

Videos that can't be read go to a rejects CSV (uri, row, reason, error_type, detail), by default
next to the index (<out without .parquet>.rejects.csv). Progress is logged with an ETA.
"""

from __future__ import annotations

import argparse
import logging
import sys

from morphmlp.errors import MorphMLPError, StorageError


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    source = parser.add_mutually_exclusive_group(required=True)
    source.add_argument(
        "--from-kinetics-csv",
        nargs="+",
        metavar="CSV",
        help="Kinetics CSV(s): the release's 'path,label' or the official "
        "'label,youtube_id,time_start,time_end,split'",
    )
    source.add_argument(
        "--from-ssv2", nargs="+", metavar="ANNOT.json", help="Something-Something V2 annotations"
    )
    source.add_argument("--from-folder", metavar="DIR", help="DIR/<class>/<video> folders")
    parser.add_argument(
        "--labels",
        help="SSv2 labels JSON; for a path,label CSV the class names (JSON list, JSON "
        "{name: index} or one name per line)",
    )
    parser.add_argument("--video-root", help="folder (URI) the annotations' videos are in")
    parser.add_argument("--split", help="split of every row (default: from the file names)")
    parser.add_argument("--out", required=True, help="index URI to write (.parquet)")
    parser.add_argument(
        "--rejects", help="rejects file (default: <out without .parquet>.rejects.csv)"
    )
    parser.add_argument(
        "--cpus-per-probe", type=float, default=1.0, help="CPUs per probing task (default 1)"
    )
    parser.add_argument("--address", help="Ray cluster address (default: RAY_ADDRESS or local)")
    args = parser.parse_args(argv)
    if (args.from_kinetics_csv or args.from_ssv2) and not args.video_root:
        parser.error("--video-root is required with --from-kinetics-csv and --from-ssv2")
    if args.from_ssv2 and not args.labels:
        parser.error("--from-ssv2 needs --labels something-something-v2-labels.json")
    return args


def main(argv: list[str] | None = None) -> int:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s", datefmt="%H:%M:%S")
    args = parse_args(argv)
    from morphmlp import storage
    from morphmlp.cluster import ray_session
    from morphmlp.data import builders, probe

    try:
        # Where the index and the rejects go must be writable before a single video is probed.
        for flag, uri in (("--out", args.out), ("--rejects", args.rejects)):
            if uri:
                try:
                    storage.check_writable(storage.parent(uri))
                except StorageError as err:
                    raise StorageError(f"{flag} {storage.redact(uri)}: {err}") from err
        if args.from_folder:
            candidates, class_names = builders.build_index_from_folder(
                args.from_folder, split=args.split
            )
        elif args.from_ssv2:
            candidates, class_names = builders.build_index_from_ssv2(
                args.from_ssv2, args.labels, args.video_root, split=args.split
            )
        else:
            names = builders.load_class_names(args.labels) if args.labels else None
            candidates, class_names = builders.build_index_from_kinetics_csv(
                args.from_kinetics_csv, args.video_root, class_names=names, split=args.split
            )
        with ray_session(args.address):
            prepared = probe.prepare_index(
                candidates,
                class_names,
                args.out,
                rejects_uri=args.rejects,
                num_cpus=args.cpus_per_probe,
            )
    except MorphMLPError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    print(f"Index: {storage.redact(args.out)} ({len(prepared)} videos)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
