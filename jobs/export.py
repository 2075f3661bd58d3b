"""Export a MorphMLP checkpoint as a torch.export program (.pt2) and/or ONNX, numerically checked.

Examples:
  python jobs/export.py --model models:/morphmlp@best --format both --out export/
  python jobs/export.py --model runs:/<run_id> --format onnx --out export/
  python jobs/export.py --model model.pt --format torch-export --out export/

Writes model.pt2 and/or model.onnx (ONNX opset 18, the dynamo exporter) into DIR, each with a
sidecar <file>.json: input clips float32 (B, 3, T, H, W) normalised with the recorded mean/std,
B dynamic; frames, size, class names, the model config and the test-time data settings.
Before anything is kept, the saved files are run (torch.export.load; ONNX Runtime on CPU)
against the eager model on random clips at batch 1 and 2: max |Δ| of the logits must be
<= 1e-4 (fp32), else the export fails and DIR is left as it was.
jobs/predict.py runs the exported files (--model DIR/model.onnx).
Exit code: 0 exported, 2 bad input or a failed check (one line on stderr).
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
    parser.add_argument("--model", required=True, help="checkpoint reference (as evaluate.py)")
    parser.add_argument(
        "--format", default="both", help="torch-export, onnx or both (default both)"
    )
    parser.add_argument("--out", required=True, help="local folder to write into")
    parser.add_argument(
        "--tolerance", type=float, default=1e-4, help="max |Δ| vs eager (default 1e-4)"
    )
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s", datefmt="%H:%M:%S")
    args = parse_args(argv)
    from morphmlp import tracking
    from morphmlp.evaluate.export import ExportConfig, export, formats_for

    try:
        cfg = ExportConfig(formats=formats_for(args.format), tolerance=args.tolerance)
        if args.model.startswith(("models:/", "runs:/")):
            tracking.check_reachable(tracking.tracking_uri())
        written = export(args.model, args.out, cfg)
    except MorphMLPError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    for path in written:
        print(f"wrote {path} (+ {path}.json)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
