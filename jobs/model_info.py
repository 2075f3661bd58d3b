"""Parameters and GMACs of MorphMLP variants as a Markdown table (counted on the meta device).

    python jobs/model_info.py                                  # every variant at its frames/size
    python jobs/model_info.py --variants s b --frames 16 32 --img-sizes 224 256

GMACs = FLOPs / 2 from torch's FlopCounterMode, per clip (one view). Combinations whose chunk
lengths don't fit the resolution are listed with the reason.
"""

from __future__ import annotations

import argparse
import sys

from morphmlp.errors import ConfigError
from morphmlp.models import count_gmacs, count_params, list_models, variant_config, variant_name

# Frames shown by default: the release's 16 and 32 for s and b, the demo's 8 for xs.
DEFAULT_FRAMES = {"morphmlp_xs": (8,), "morphmlp_s": (16, 32), "morphmlp_b": (16, 32)}


def rows(variants, frames, img_sizes, num_classes):
    for name in map(variant_name, variants):
        default = variant_config(name)
        frame_counts = (1,) if default.is_image else frames or DEFAULT_FRAMES.get(name, (16,))
        for num_frames in frame_counts:
            for img_size in img_sizes or (default.img_size,):
                overrides = {"num_frames": num_frames, "img_size": img_size}
                if num_classes is not None:
                    overrides["num_classes"] = num_classes
                try:
                    cfg = variant_config(name, **overrides)
                except ConfigError as err:
                    yield [name, num_frames, img_size, "", "", "", "", f"invalid: {err}"]
                    continue
                planes = " ".join(f"{t}×{h}×{w}" for t, h, w in cfg.grids)
                groups = cfg.resolved_temporal_groups
                yield [
                    name,
                    num_frames,
                    img_size,
                    cfg.num_classes,
                    f"{count_params(cfg) / 1e6:.2f}",
                    f"{count_gmacs(cfg):.2f}",
                    "-" if groups is None else ", ".join(map(str, groups)),
                    f"{planes}; chunks {', '.join(map(str, cfg.chunk_lengths))}",
                ]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--variants", nargs="+", default=list_models(), metavar="NAME")
    parser.add_argument("--frames", nargs="+", type=int, help="frame counts (video variants)")
    parser.add_argument("--img-sizes", nargs="+", type=int, help="default: each variant's own")
    parser.add_argument("--num-classes", type=int, help="default: each variant's own")
    args = parser.parse_args(argv)
    header = [
        "variant",
        "frames",
        "img",
        "classes",
        "params (M)",
        "GMACs",
        "temporal groups",
        "token grids (T×H×W per stage)",
    ]
    try:
        table = list(rows(args.variants, args.frames, args.img_sizes, args.num_classes))
    except ConfigError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    print("| " + " | ".join(header) + " |")
    print("|" + "|".join("---" for _ in header) + "|")
    for row in table:
        print("| " + " | ".join(map(str, row)) + " |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
