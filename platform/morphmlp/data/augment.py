"""Per-clip augmentation on CPU in the decode actors: one set of random parameters for all frames.

Clips are (T, C, H, W) uint8 tensors; torchvision.transforms.v2 treats the leading T as a batch of
frames and draws its random parameters once, so the crop, flip and RandAugment ops are the same on
every frame. Randomness comes from a numpy Generator seeded per sample (seed, epoch, row), and the
torchvision transforms run inside a fork of torch's RNG seeded from it, so a sample is identical
whichever actor makes it.

RandAugment follows timm's policy string as the release uses it (`rand-m7-n4-mstd0.5-inc1`: 4 ops
drawn with replacement from timm's 15, each applied with probability 0.5 at magnitude
N(7, 0.5) clipped to [0, 10], signed ops negated half the time; inc1 = the "increasing" variants),
with torchvision's kernels for the pixel work. Differences from the release, all small:
- geometric ops interpolate bilinearly (torchvision's tensor kernels have no bicubic affine);
  the release passes bicubic to PIL;
- it runs after the crop (on 224² instead of the ~256x340 decoded frame: ~1.7x less work), so
  relative translations are relative to the crop; the release runs it before the crop;
- the crop resize is antialiased bilinear (torchvision); the release uses F.interpolate without
  antialias;
- pixel kernels are torchvision's, not PIL's (rounding differs by a grey level here and there).
"""

from __future__ import annotations

import math
import re

import numpy as np
import torch
from torchvision.transforms import v2
from torchvision.transforms.v2 import functional as F

from morphmlp.data.config import DataConfig

_BILINEAR = v2.InterpolationMode.BILINEAR
_FILL = [128.0, 128.0, 128.0]  # timm's fill colour for geometric ops
_MAX_LEVEL = 10.0


def train_augment(
    clip: torch.Tensor, label: int, cfg: DataConfig, rng: np.random.Generator
) -> tuple[torch.Tensor, int]:
    """Random crop, flip (+ label swap) and RandAugment of one (T, C, H, W) uint8 clip."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(int(rng.integers(2**62)))
        size = cfg.train_crop_size
        if cfg.train_crop == "random_resized":
            crop = v2.RandomResizedCrop(size, scale=cfg.rrc_scale, ratio=cfg.rrc_ratio)
            clip = crop(clip)
        else:
            short_side = round(rng.uniform(*cfg.train_jitter_scales))
            clip = F.resize(clip, [short_side])
            clip = v2.RandomCrop(size)(clip)
    if cfg.random_flip and rng.random() < 0.5:
        clip = F.horizontal_flip(clip)
        if cfg.flip_label_map is not None:
            label = cfg.flip_label_map.get(label, label)
    if cfg.rand_augment:
        clip = RandAugment(cfg.rand_augment)(clip, rng)
    return clip, label


def uniform_crops(clip: torch.Tensor, crop_size: int, num_crops: int) -> list[torch.Tensor]:
    """PySlowFast's uniform_crop: one center crop, or three along the long side."""
    height, width = clip.shape[-2:]
    spatial = [1] if num_crops == 1 else [0, 1, 2]
    crops = []
    for spatial_idx in spatial:
        top = math.ceil((height - crop_size) / 2)
        left = math.ceil((width - crop_size) / 2)
        if height > width:
            top = {0: 0, 1: top, 2: height - crop_size}[spatial_idx]
        else:
            left = {0: 0, 1: left, 2: width - crop_size}[spatial_idx]
        crops.append(clip[..., top : top + crop_size, left : left + crop_size])
    return crops


class RandAugment:
    """timm-style RandAugment for a clip: same op and magnitude on every frame."""

    def __init__(self, spec: str):
        self.magnitude = 10.0
        self.num_ops = 2
        self.magnitude_std = 0.0
        increasing = False
        for part in spec.split("-")[1:]:
            key, value = re.match(r"([a-z]+)(.*)", part).groups()
            if key == "m":
                self.magnitude = float(value)
            elif key == "n":
                self.num_ops = int(value)
            elif key == "mstd":
                self.magnitude_std = float(value)
            elif key == "inc":
                increasing = value == "1"
        self.ops = _INCREASING_OPS if increasing else _OPS

    def __call__(self, clip: torch.Tensor, rng: np.random.Generator) -> torch.Tensor:
        for op in rng.choice(len(self.ops), self.num_ops, replace=True):
            if rng.random() > 0.5:
                continue
            magnitude = self.magnitude
            if self.magnitude_std > 0:
                magnitude = rng.normal(magnitude, self.magnitude_std)
            level = min(_MAX_LEVEL, max(0.0, magnitude)) / _MAX_LEVEL
            clip = self.ops[op](clip, level, rng)
        return clip


def _signed(value: float, rng: np.random.Generator) -> float:
    return -value if rng.random() < 0.5 else value


def _affine(clip, *, angle=0.0, translate=(0, 0), shear=(0.0, 0.0), center=None):
    return F.affine(
        clip,
        angle=angle,
        translate=list(translate),
        scale=1.0,
        shear=list(shear),
        interpolation=_BILINEAR,
        fill=_FILL,
        center=center,
    )


def _rotate(clip, level, rng):
    return F.rotate(clip, _signed(level * 30.0, rng), interpolation=_BILINEAR, fill=_FILL)


def _shear_x(clip, level, rng):
    # center=[0, 0]: shear about the top-left corner, as PIL's affine transform does.
    angle = math.degrees(math.atan(_signed(level * 0.3, rng)))
    return _affine(clip, shear=(angle, 0.0), center=[0, 0])


def _shear_y(clip, level, rng):
    angle = math.degrees(math.atan(_signed(level * 0.3, rng)))
    return _affine(clip, shear=(0.0, angle), center=[0, 0])


def _translate_x(clip, level, rng):
    return _affine(clip, translate=(round(_signed(level * 0.45, rng) * clip.shape[-1]), 0))


def _translate_y(clip, level, rng):
    return _affine(clip, translate=(0, round(_signed(level * 0.45, rng) * clip.shape[-2])))


def _posterize(clip, level, rng):
    return F.posterize(clip, int(level * 4))


def _posterize_increasing(clip, level, rng):
    return F.posterize(clip, 4 - int(level * 4))


def _solarize(clip, level, rng):
    threshold = int(level * 256)
    return clip if threshold > 255 else F.solarize(clip, threshold)


def _solarize_increasing(clip, level, rng):
    threshold = 256 - int(level * 256)
    return clip if threshold > 255 else F.solarize(clip, threshold)


def _solarize_add(clip, level, rng):
    added = (clip.to(torch.int16) + int(level * 110)).clamp(max=255).to(torch.uint8)
    return torch.where(clip < 128, added, clip)


def _enhance(fn):
    """timm's "Color/Contrast/Brightness/Sharpness": factor in [0.1, 1.9] rising with level."""
    return lambda clip, level, rng: fn(clip, level * 1.8 + 0.1)


def _enhance_increasing(fn):
    """The inc1 variants: factor 1 +- 0.9 * level, so the change grows with the magnitude."""
    return lambda clip, level, rng: fn(clip, 1.0 + _signed(level * 0.9, rng))


_COMMON_OPS = [
    lambda clip, level, rng: F.autocontrast(clip),
    lambda clip, level, rng: F.equalize(clip),
    lambda clip, level, rng: F.invert(clip),
    _rotate,
]
_GEOMETRIC_OPS = [_shear_x, _shear_y, _translate_x, _translate_y]
# Same order as timm's _RAND_TRANSFORMS / _RAND_INCREASING_TRANSFORMS.
_OPS = [
    *_COMMON_OPS,
    _posterize,
    _solarize,
    _solarize_add,
    _enhance(F.adjust_saturation),
    _enhance(F.adjust_contrast),
    _enhance(F.adjust_brightness),
    _enhance(F.adjust_sharpness),
    *_GEOMETRIC_OPS,
]
_INCREASING_OPS = [
    *_COMMON_OPS,
    _posterize_increasing,
    _solarize_increasing,
    _solarize_add,
    _enhance_increasing(F.adjust_saturation),
    _enhance_increasing(F.adjust_contrast),
    _enhance_increasing(F.adjust_brightness),
    _enhance_increasing(F.adjust_sharpness),
    *_GEOMETRIC_OPS,
]
