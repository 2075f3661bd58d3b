"""DataConfig: how clips are sampled, decoded and augmented. Defaults = the release's K400 recipe.

The release (MTLab/MorphMLP, PySlowFast) trains Kinetics-400 with 16 frames at stride 4 (at 30 fps),
RandomResizedCrop 224 from frames decoded at short side 256, RandAugment rand-m7-n4-mstd0.5-inc1
and random erasing 0.25; Something-Something V2 uses segment sampling and no flip. Invalid values
fail here, at construction, with the field and value named (morphmlp.config's check rules).
"""

from __future__ import annotations

import importlib.util
import re
from dataclasses import dataclass
from typing import Literal

from morphmlp.config import check, check_at_least, check_positive, check_range
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
    # Repeated augmentation (the release's AUG.NUM_SAMPLE): a training video is decoded once and
    # yields this many clips, each with its own crop/flip/RandAugment/erasing draw (pipeline.py).
    num_samples: int = 1
    # Where RandAugment runs: "actor" = Pillow in the decode actors (the release's kernels);
    # "worker" = torch on the training worker's device (worker_augment.py), on the uint8 batch.
    augment_on: Literal["actor", "worker"] = "actor"
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
        check_positive(
            "data",
            self,
            "num_frames",
            "sampling_rate",
            "target_fps",
            "train_crop_size",
            "test_crop_size",
            "test_num_clips",
            "decode_batch_size",
            "cpus_per_decode_actor",
        )
        check_at_least("data", self, 0, "decode_threads", "val_cache_mb")
        check(
            "data",
            self,
            "num_samples",
            isinstance(self.num_samples, int)
            and not isinstance(self.num_samples, bool)
            and self.num_samples >= 1,
            "an integer >= 1 (clips per decoded training video)",
        )
        check(
            "data",
            self,
            "augment_on",
            self.augment_on in ("actor", "worker"),
            "'actor' (Pillow in the decode actors) or 'worker' (torch on the training worker)",
        )
        if self.augment_on == "worker" and importlib.util.find_spec("torch") is None:
            raise ConfigError(
                "data.augment_on='worker' needs torch on the training workers, and torch is not "
                "installed here; use data.augment_on='actor' or install torch"
            )
        check_range("data", self, "random_erasing", 0, 1)
        check_range("data", self, "max_bad_fraction", 0, 1)
        check(
            "data", self, "sampling", self.sampling in ("dense", "segment"), "'dense' or 'segment'"
        )
        check(
            "data",
            self,
            "train_crop",
            self.train_crop in ("random_resized", "jitter"),
            "'random_resized' or 'jitter'",
        )
        lo, hi = self.train_jitter_scales
        check("data", self, "train_jitter_scales", 0 < lo <= hi, "(min, max) with 0 < min <= max")
        if self.train_crop == "jitter" and lo < self.train_crop_size:
            raise ConfigError(
                f"data.train_jitter_scales: min {lo} is smaller than data.train_crop_size "
                f"{self.train_crop_size}; a random crop needs a short side >= the crop"
            )
        scale, ratio = self.rrc_scale, self.rrc_ratio
        check("data", self, "rrc_scale", 0 < scale[0] <= scale[1] <= 1, "0 < min <= max <= 1")
        check("data", self, "rrc_ratio", 0 < ratio[0] <= ratio[1], "0 < min <= max")
        check(
            "data",
            self,
            "flip_label_map",
            self.flip_label_map is None
            or all(_class_index(k) and _class_index(v) for k, v in self.flip_label_map.items()),
            "a map of class indices (integers >= 0) or null",
        )
        check(
            "data",
            self,
            "rand_augment",
            self.rand_augment is None or bool(RAND_AUGMENT_PATTERN.match(self.rand_augment)),
            "a RandAugment string like 'rand-m7-n4-mstd0.5-inc1' (m magnitude 0-10, n ops, "
            "mstd magnitude std, inc 0|1), or null to disable",
        )
        check("data", self, "std", all(s > 0 for s in self.std), "> 0 in every channel")
        check(
            "data",
            self,
            "test_num_crops",
            self.test_num_crops in (1, 3),
            "1 (center) or 3 (left/center/right or top/center/bottom)",
        )
        if self.test_short_side(1) < self.test_crop_size:
            raise ConfigError(
                f"data.test_scale (or, when unset, data.train_jitter_scales[0]): "
                f"{self.test_short_side(1)} is smaller than data.test_crop_size "
                f"{self.test_crop_size}; the test crop must fit in the resized frame"
            )
        low, high = self.decode_actors
        check("data", self, "decode_actors", 1 <= low <= high, "(min, max) with 1 <= min <= max")
        resource = self.decode_resource
        check(
            "data",
            self,
            "decode_resource",
            resource is None
            or (isinstance(resource, str) and resource and resource not in RAY_BUILTIN_RESOURCES),
            "the name of a custom Ray resource (the cluster configs use 'decode'), not one of "
            f"{', '.join(RAY_BUILTIN_RESOURCES)}, or null for CPUs only",
        )

    @property
    def decode_short_side(self) -> int:
        """Short side frames are scaled to while decoding for training."""
        return self.train_jitter_scales[0]

    def test_short_side(self, num_crops: int) -> int:
        if self.test_scale is not None:
            return self.test_scale
        return self.train_jitter_scales[0] if num_crops == 1 else self.test_crop_size


def _class_index(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= 0
