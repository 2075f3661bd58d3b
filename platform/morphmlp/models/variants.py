"""MorphMLP architectures as data: a typed config, the named variants, and the rules that say
which chunk lengths and temporal groups fit a given resolution and width.

This module imports no torch, so the architecture search can build valid spaces cheaply.
Every check runs when a `MorphMLPConfig` is constructed, before any weight is allocated.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass

from morphmlp.config import from_dict, load_yaml, to_dict
from morphmlp.errors import ConfigError

# The stem halves time once (a stride-2 temporal conv) and space twice; each later stage halves
# space once more. With kernel 3 and padding 1 a stride-2 conv maps n to ceil(n / 2).
STEM_SPATIAL_STRIDES = 2
TEMPORAL_INITS = ("release", "zero_proj")


@dataclass(frozen=True)
class MorphMLPConfig:
    """Everything that defines a MorphMLP network. Defaults are the release's MorphMLP-S, K400-16
    (temporal_init aside: see there).

    num_frames == 1 makes an image model: a 2-D stem and no temporal branch (MorphFC_t).
    temporal_groups=None applies the release's rule per stage (see `default_temporal_groups`).
    """

    depths: tuple[int, ...] = (3, 4, 9, 3)
    widths: tuple[int, ...] = (112, 224, 392, 784)
    chunk_lengths: tuple[int, ...] = (14, 28, 28, 49)
    temporal_groups: tuple[int, ...] | None = None
    mlp_ratio: float = 3.0
    num_frames: int = 16
    img_size: int = 224
    in_chans: int = 3
    num_classes: int = 400
    drop_path_rate: float = 0.1
    bias: bool = True  # biases of the token/channel/temporal FCs (the release's QKV_BIAS)
    # How MorphFC_t starts; both make it output zero, so each block starts spatial-only and an
    # inflated image model's outputs are kept. "zero_proj" (the default, for training from
    # scratch or from inflated image weights): mlp_t random (std 0.02), proj = 0, the usual
    # zero-init residual branch; proj gets a gradient from the first step, mlp_t from the second.
    # "release": mlp_t = 0 and proj = 1, the release's. A change of mlp_t then moves every channel
    # of the branch's output alike, which the LayerNorm after it removes, so neither weight gets
    # a gradient (1e-11 measured, float noise): the branch wakes only as AdamW amplifies that
    # noise. On the demo it did (12 epochs, 2 seeds), ending 1.7-2.5 points of top-1 behind
    # zero_proj. Loading a trained checkpoint (the release's or ours) replaces both weights.
    temporal_init: str = "zero_proj"

    def __post_init__(self) -> None:
        for field in ("depths", "widths", "chunk_lengths", "temporal_groups"):
            value = getattr(self, field)
            if value is not None:  # lists from callers become tuples: configs stay hashable
                object.__setattr__(self, field, tuple(value))
        _validate(self)

    @property
    def is_image(self) -> bool:
        return self.num_frames == 1

    @property
    def num_stages(self) -> int:
        return len(self.depths)

    @property
    def grids(self) -> list[tuple[int, int, int]]:
        """Token grid (T, H, W) of each stage for this config's input size."""
        return stage_grids(self.img_size, self.num_frames, self.num_stages)

    @property
    def resolved_temporal_groups(self) -> tuple[int, ...] | None:
        """Temporal channel groups per stage (None for an image model)."""
        if self.is_image:
            return None
        if self.temporal_groups is not None:
            return self.temporal_groups
        return tuple(
            default_temporal_groups(t, width)
            for (t, _, _), width in zip(self.grids, self.widths, strict=True)
        )


def stage_grids(img_size: int, num_frames: int, num_stages: int = 4) -> list[tuple[int, int, int]]:
    """Token grid (T, H, W) entering each stage, e.g. 16x224² -> (8,56,56) ... (8,7,7)."""
    t = 1 if num_frames == 1 else _halve(num_frames)
    side = img_size
    for _ in range(STEM_SPATIAL_STRIDES):
        side = _halve(side)
    grids = []
    for _ in range(num_stages):
        grids.append((t, side, side))
        side = _halve(side)
    return grids


def valid_chunk_lengths(plane_tokens: int, width: int) -> list[int]:
    """Chunk lengths L that fit a stage: L divides the H*W plane (whole chunks) and the width
    (L channel groups of width/L channels, so the chunk FC is width x width)."""
    return _divisors(math.gcd(plane_tokens, width))


def valid_temporal_groups(width: int) -> list[int]:
    """Temporal group counts that fit a stage: they must divide the width."""
    return _divisors(width)


def default_temporal_groups(temporal_tokens: int, width: int) -> int:
    """The release's rule, generalised: as many groups as temporal tokens (so the temporal FC is
    width x width), else the largest divisor of the width below that. It reproduces the release
    exactly: 8 groups for 16 frames; 16 for 32 frames except 14 at width 392 (FC 448 x 448)."""
    return max(g for g in _divisors(width) if g <= temporal_tokens)


def _validate(cfg: MorphMLPConfig) -> None:
    n = len(cfg.depths)
    if n == 0:
        raise ConfigError("depths: need at least one stage")
    for field in ("widths", "chunk_lengths", "temporal_groups"):
        value = getattr(cfg, field)
        if value is not None and len(value) != n:
            raise ConfigError(
                f"{field}: {len(value)} values for {n} stages (depths={list(cfg.depths)}); "
                f"give one per stage"
            )
    if cfg.temporal_init not in TEMPORAL_INITS:
        raise ConfigError(
            f"temporal_init: {cfg.temporal_init!r}; choose one of {', '.join(TEMPORAL_INITS)}"
        )
    _check_positive("depths", cfg.depths)
    _check_positive("widths", cfg.widths)
    _check_positive("chunk_lengths", cfg.chunk_lengths)
    for field, value, low in (
        ("num_frames", cfg.num_frames, 1),
        ("img_size", cfg.img_size, 1),
        ("in_chans", cfg.in_chans, 1),
        ("num_classes", cfg.num_classes, 0),
    ):
        if value < low:
            raise ConfigError(f"{field}: {value} must be at least {low}")
    if cfg.mlp_ratio <= 0:
        raise ConfigError(f"mlp_ratio: {cfg.mlp_ratio} must be positive")
    if not 0.0 <= cfg.drop_path_rate < 1.0:
        raise ConfigError(f"drop_path_rate: {cfg.drop_path_rate} must be in [0, 1)")
    for i, width in enumerate(cfg.widths, start=1):
        # the reweighting MLP has width // 4 hidden units; the stem's first conv width // 2
        if width < 4:
            raise ConfigError(f"stage {i}: width {width} is too small; use at least 4")

    for i, ((t, h, w), width, length) in enumerate(
        zip(cfg.grids, cfg.widths, cfg.chunk_lengths, strict=True), start=1
    ):
        valid = valid_chunk_lengths(h * w, width)
        if length not in valid:
            raise ConfigError(
                f"stage {i}: chunk length {length} must divide the {h}×{w}={h * w}-token plane "
                f"(img_size {cfg.img_size}) and width {width}; valid chunk lengths here: "
                f"{', '.join(map(str, valid))}"
            )
        if cfg.temporal_groups is not None and not cfg.is_image:
            groups = cfg.temporal_groups[i - 1]
            if groups < 1 or width % groups:
                raise ConfigError(
                    f"stage {i}: temporal groups {groups} must divide width {width} "
                    f"({t} temporal tokens); valid: {', '.join(map(str, _divisors(width)))}"
                )


def _check_positive(field: str, values: tuple[int, ...]) -> None:
    for i, v in enumerate(values, start=1):
        if v < 1:
            raise ConfigError(f"stage {i}: {field[:-1].replace('_', ' ')} {v} must be positive")


def _halve(n: int) -> int:
    return (n + 1) // 2


def _divisors(n: int) -> list[int]:
    return [d for d in range(1, n + 1) if n % d == 0]


# The named variants. Widths, depths and chunk lengths of s and b are the release's (K400 and
# SSv2 configs); the drop-path rates are its K400 recipe. xs is ours: sized for the demo on
# 2 CPU cores (8 frames at 112², planes 28², 14², 7², 4²); its chunks grow from half a row to
# the whole plane like the release's, and widths are multiples of 7 so the 7-wide planes fit.
_VIDEO = {
    "morphmlp_xs": MorphMLPConfig(
        depths=(1, 1, 2, 1),
        widths=(28, 56, 112, 224),
        chunk_lengths=(14, 28, 7, 16),
        num_frames=8,
        img_size=112,
        drop_path_rate=0.0,
    ),
    "morphmlp_s": MorphMLPConfig(depths=(3, 4, 9, 3), drop_path_rate=0.1),
    "morphmlp_b": MorphMLPConfig(depths=(4, 6, 15, 4), drop_path_rate=0.3),
}
# Image variants for ImageNet-style pretraining; `inflate_image_checkpoint` turns their weights
# into the video model's.
VARIANTS: dict[str, MorphMLPConfig] = {
    **_VIDEO,
    **{
        f"{name}_image": dataclasses.replace(cfg, num_frames=1, num_classes=1000)
        for name, cfg in _VIDEO.items()
    },
}
_PREFIX = "morphmlp_"


def list_models() -> list[str]:
    return sorted(VARIANTS)


def variant_name(name: str) -> str:
    """The registered name for `name`, which may leave out the 'morphmlp_' prefix."""
    key = name if name.startswith(_PREFIX) else _PREFIX + name
    if key not in VARIANTS:
        raise ConfigError(
            f"unknown MorphMLP variant {name!r}; choose one of {', '.join(list_models())} "
            f"(the '{_PREFIX}' prefix may be left out)"
        )
    return key


def variant_config(name: str, **overrides) -> MorphMLPConfig:
    """Config of a named variant ("morphmlp_s" or the short "s"), with fields overridden."""
    key = variant_name(name)
    # from_dict checks the overrides' names and types like any other config source.
    return from_dict(MorphMLPConfig, {**to_dict(VARIANTS[key]), **overrides}, where=key)


def load_variant_file(uri: str) -> MorphMLPConfig:
    """A YAML file (any URI) with MorphMLPConfig fields; `variant: s` starts from a named one."""
    data = load_yaml(uri)
    base = data.pop("variant", None)
    try:
        if base is not None:
            return variant_config(str(base), **data)
        return from_dict(MorphMLPConfig, data)
    except ConfigError as err:
        raise ConfigError(f"{uri}: {err}") from err


def save_variant_file(cfg: MorphMLPConfig, uri: str) -> None:
    """Write every field, so the file alone describes the architecture."""
    import yaml

    from morphmlp.storage import write_bytes_atomic

    text = yaml.safe_dump(to_dict(cfg), sort_keys=False)
    write_bytes_atomic(uri, text.encode("utf-8"))
