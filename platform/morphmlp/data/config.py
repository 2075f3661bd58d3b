"""DataConfig: how clips are sampled, decoded and augmented. Defaults = the release's K400 recipe.

The release (MTLab/MorphMLP, PySlowFast) trains Kinetics-400 with 16 frames at stride 4 (at 30 fps),
RandomResizedCrop 224 from frames decoded at short side 256, RandAugment rand-m7-n4-mstd0.5-inc1
and random erasing 0.25; Something-Something V2 uses segment sampling and no flip. Invalid values
fail here, at construction, with the field and value named.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Literal

from morphmlp.errors import ConfigError

# timm's RandAugment string: rand-m<magnitude>-n<num ops>-mstd<magnitude std>-inc<0|1>.
RAND_AUGMENT_PATTERN = re.compile(r"^rand(-m\d+(\.\d+)?|-n\d+|-mstd\d+(\.\d+)?|-inc[01])*$")
# Resources Ray defines itself; data.decode_resource must be a custom one.
RAY_BUILTIN_RESOURCES = ("CPU", "GPU", "memory", "object_store_memory")


@dataclass
class DataConfig:
    num_frames: int = 16
    # dense = Kinetics (num_frames at a stride); segment = SSv2 (one frame per equal segment).
    sampling: Literal["dense", "segment"] = "dense"
    sampling_rate: int = 4  # dense: stride between sampled frames, counted at target_fps
    target_fps: float = 30.0  # dense: videos at other rates are resampled to this one first
    train_crop_size: int = 224
    test_crop_size: int = 224
    train_crop: Literal["random_resized", "jitter"] = "random_resized"
    # Frames are decoded at short side train_jitter_scales[0] (the release's max_spatial_scale);
    # "jitter" then rescales the short side to a random size in this range before a random crop.
    train_jitter_scales: tuple[int, int] = (256, 320)
    rrc_scale: tuple[float, float] = (0.08, 1.0)
    rrc_ratio: tuple[float, float] = (0.75, 1.3333)
    random_flip: bool = True
    # Labels that swap under a horizontal flip (SSv2 "left"<->"right", MMAction2 style). A flip of a
    # sample whose label is a key relabels it; labels not in the map keep theirs.
    flip_label_map: dict[int, int] | None = None
    rand_augment: str | None = "rand-m7-n4-mstd0.5-inc1"
    random_erasing: float = 0.25  # applied on the training worker (transforms.random_erasing)
    mean: tuple[float, float, float] = (0.45, 0.45, 0.45)
    std: tuple[float, float, float] = (0.225, 0.225, 0.225)
    test_num_clips: int = 1  # validation during training uses 1x1; evaluation sets 4x1, 1x3...
    test_num_crops: int = 1
    # Short side before the test crops. None = the release's rule: train_jitter_scales[0] for one
    # (center) crop, test_crop_size for three crops (which then span the long side).
    test_scale: int | None = None
    decode_threads: int = 1  # per decode actor (PyAV thread_type AUTO); 0 = FFmpeg's choice
    decode_actors: tuple[int, int] = (1, 8)  # ActorPoolStrategy min/max size
    cpus_per_decode_actor: float = 1.0  # fractional: Train workers' CPUs come out of Data's budget
    # A custom Ray resource each decode actor also asks for (cpus_per_decode_actor units), to keep
    # decoding on the cores a cluster sets aside for it: the configs in cluster/ name it "decode".
    # None: CPUs only, so actors go to any node with free CPUs (a local Ray has no "decode").
    decode_resource: str | None = None
    decode_batch_size: int = 4  # clips per decode call: small keeps every actor busy
    max_bad_fraction: float = 0.01
    # Training's per-epoch validation: a worker keeps its decoded views (deterministic) when they
    # fit in this many MiB, and decodes them only once. 0: decode every epoch.
    val_cache_mb: int = 1024

    def __post_init__(self) -> None:
        _positive_int("num_frames", self.num_frames)
        _positive_int("sampling_rate", self.sampling_rate)
        _positive_int("train_crop_size", self.train_crop_size)
        _positive_int("test_crop_size", self.test_crop_size)
        _positive_int("test_num_clips", self.test_num_clips)
        _positive_int("decode_batch_size", self.decode_batch_size)
        if self.sampling not in ("dense", "segment"):
            raise ConfigError(f"data.sampling: {self.sampling!r}; choose 'dense' or 'segment'")
        if self.train_crop not in ("random_resized", "jitter"):
            raise ConfigError(
                f"data.train_crop: {self.train_crop!r}; choose 'random_resized' or 'jitter'"
            )
        if not self.target_fps > 0:
            raise ConfigError(f"data.target_fps: {self.target_fps!r}; must be > 0")
        lo, hi = self.train_jitter_scales
        if not 0 < lo <= hi:
            raise ConfigError(
                f"data.train_jitter_scales: {self.train_jitter_scales!r}; need 0 < min <= max"
            )
        if self.train_crop == "jitter" and lo < self.train_crop_size:
            raise ConfigError(
                f"data.train_jitter_scales: min {lo} is smaller than data.train_crop_size "
                f"{self.train_crop_size}; a random crop needs a short side >= the crop"
            )
        if not 0 < self.rrc_scale[0] <= self.rrc_scale[1] <= 1:
            raise ConfigError(f"data.rrc_scale: {self.rrc_scale!r}; need 0 < min <= max <= 1")
        if not 0 < self.rrc_ratio[0] <= self.rrc_ratio[1]:
            raise ConfigError(f"data.rrc_ratio: {self.rrc_ratio!r}; need 0 < min <= max")
        if self.flip_label_map is not None:
            for key, value in self.flip_label_map.items():
                if not (
                    isinstance(key, int) and isinstance(value, int) and key >= 0 and value >= 0
                ):
                    raise ConfigError(
                        f"data.flip_label_map: entry {key!r}: {value!r}; "
                        "keys and values must be class indices (integers >= 0)"
                    )
        if self.rand_augment is not None and not RAND_AUGMENT_PATTERN.match(self.rand_augment):
            raise ConfigError(
                f"data.rand_augment: {self.rand_augment!r} is not a RandAugment string like "
                "'rand-m7-n4-mstd0.5-inc1' (m magnitude 0-10, n ops, mstd magnitude std, inc 0|1); "
                "use null to disable"
            )
        if not 0 <= self.random_erasing <= 1:
            raise ConfigError(f"data.random_erasing: {self.random_erasing!r}; must be in [0, 1]")
        if any(s <= 0 for s in self.std):
            raise ConfigError(f"data.std: {self.std!r}; every value must be > 0")
        if self.test_num_crops not in (1, 3):
            raise ConfigError(
                f"data.test_num_crops: {self.test_num_crops!r}; choose 1 (center) or 3 "
                "(left/center/right or top/center/bottom)"
            )
        if self.test_short_side(1) < self.test_crop_size:
            raise ConfigError(
                f"data.test_scale (or, when unset, data.train_jitter_scales[0]): "
                f"{self.test_short_side(1)} is smaller than data.test_crop_size "
                f"{self.test_crop_size}; the test crop must fit in the resized frame"
            )
        if self.decode_threads < 0:
            raise ConfigError(f"data.decode_threads: {self.decode_threads!r}; must be >= 0")
        low, high = self.decode_actors
        if not 1 <= low <= high:
            raise ConfigError(f"data.decode_actors: {self.decode_actors!r}; need 1 <= min <= max")
        if not self.cpus_per_decode_actor > 0:
            raise ConfigError(
                f"data.cpus_per_decode_actor: {self.cpus_per_decode_actor!r}; must be > 0"
            )
        if self.decode_resource is not None and (
            not isinstance(self.decode_resource, str)
            or not self.decode_resource
            or self.decode_resource in RAY_BUILTIN_RESOURCES
        ):
            raise ConfigError(
                f"data.decode_resource: {self.decode_resource!r}; must be the name of a custom Ray "
                f"resource (the cluster configs use 'decode'), not one of "
                f"{', '.join(RAY_BUILTIN_RESOURCES)}, or null for CPUs only"
            )
        if self.val_cache_mb < 0:
            raise ConfigError(f"data.val_cache_mb: {self.val_cache_mb!r}; must be >= 0")
        if not 0 <= self.max_bad_fraction <= 1:
            raise ConfigError(
                f"data.max_bad_fraction: {self.max_bad_fraction!r}; must be in [0, 1]"
            )

    @property
    def decode_short_side(self) -> int:
        """Short side frames are scaled to while decoding for training."""
        return self.train_jitter_scales[0]

    def test_short_side(self, num_crops: int) -> int:
        if self.test_scale is not None:
            return self.test_scale
        return self.train_jitter_scales[0] if num_crops == 1 else self.test_crop_size


def _positive_int(name: str, value: int) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ConfigError(f"data.{name}: {value!r}; must be an integer >= 1")
