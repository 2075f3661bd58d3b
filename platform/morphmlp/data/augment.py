"""Per-clip augmentation on CPU in the decode actors: one set of random parameters for all frames.

Clips come as the decoder kept them (decode.DecodedClip, YUV planes at the stored size) or as
(T, H, W, 3) uint8 RGB arrays; out come (T, size, size, 3) uint8 RGB arrays. Every parameter
(crop box, flip, RandAugment ops and magnitudes) is drawn once per clip from a numpy Generator
seeded per sample (seed, epoch, row), so a sample is identical whichever actor makes it; Pillow
then applies RandAugment to each frame, as the release (PySlowFast's rand_augment.py, from timm)
does with its list of PIL frames.

Pillow rather than torchvision keeps torch out of the decode actors: importing torch (a CUDA build
here and on GPU nodes) costs every actor about 500 MiB before it decodes a frame, and the actors
need none of it (docs/benchmarks.md, "Decode actor memory").

RandAugment follows timm's policy string as the release uses it (`rand-m7-n4-mstd0.5-inc1`: 4 ops
drawn with replacement from timm's 15, each applied with probability 0.5 at magnitude N(7, 0.5)
clipped to [0, 10], signed ops negated half the time; inc1 = the "increasing" variants), with
Pillow's kernels, as in the release. Differences from the release, all small:
- geometric ops interpolate bilinearly; the release asks Pillow for bicubic, which costs 2.3x as
  much per frame (30 instead of 13 ms for 16 frames at 224²);
- RandAugment runs after the crop (on 224² instead of the ~256x340 decoded frame: ~1.7x less work),
  so relative translations are relative to the crop; the release runs it before the crop;
- the crop box is scaled to the crop size by swscale (bilinear) from the stored picture, one
  resample as in the release (F.interpolate from the decoded frame), but with swscale's filter,
  which widens when it shrinks; RGB arrays are cropped by Pillow (bilinear, antialiased).
"""

from __future__ import annotations

import math
import re
from collections.abc import Callable

import numpy as np
from PIL import Image, ImageEnhance, ImageOps

from morphmlp.data.config import DataConfig
from morphmlp.data.decode import DecodedClip, output_size

_BILINEAR = Image.Resampling.BILINEAR
_FILL = (128, 128, 128)  # timm's fill colour for geometric ops
_MAX_LEVEL = 10.0
_RRC_ATTEMPTS = 10  # torchvision's and timm's RandomResizedCrop

Frames = list[Image.Image]


def train_augment(
    clip: np.ndarray | DecodedClip, label: int, cfg: DataConfig, rng: np.random.Generator
) -> tuple[np.ndarray, int]:
    """Random crop, flip (+ label swap) and RandAugment of one clip: a DecodedClip as the decode
    actors have it (cropped by swscale from the stored picture), or (T, H, W, 3) uint8 RGB frames
    from elsewhere (cropped by Pillow). Returns (T, size, size, 3) uint8 and the label."""
    height, width = (clip.height, clip.width) if isinstance(clip, DecodedClip) else clip.shape[1:3]
    size = cfg.train_crop_size
    if cfg.train_crop == "random_resized":
        box = _random_resized_box(height, width, cfg.rrc_scale, cfg.rrc_ratio, rng)
    else:
        box = _jitter_box(height, width, size, cfg.train_jitter_scales, rng)
    # One resample per frame: the crop box in source pixels, straight to the output size.
    if isinstance(clip, DecodedClip):
        frames = clip.crop(box, size)
    else:
        frames = np.stack(
            [np.asarray(Image.fromarray(f).resize((size, size), _BILINEAR, box=box)) for f in clip]
        )
    if cfg.random_flip and rng.random() < 0.5:
        frames = frames[:, :, ::-1]
        if cfg.flip_label_map is not None:
            label = cfg.flip_label_map.get(label, label)
    # With data.augment_on "worker", RandAugment runs on the training worker instead
    # (worker_augment.py): the actor stops at crop and flip.
    if cfg.rand_augment and cfg.augment_on == "actor":
        augmented = RandAugment(cfg.rand_augment)([Image.fromarray(f) for f in frames], rng)
        return np.stack([np.asarray(frame) for frame in augmented]), label
    return np.ascontiguousarray(frames), label


def _random_resized_box(height, width, scale, ratio, rng) -> tuple[float, float, float, float]:
    """RandomResizedCrop's box (left, top, right, bottom), drawn as torchvision and timm draw it."""
    area = height * width
    log_ratio = (math.log(ratio[0]), math.log(ratio[1]))
    for _ in range(_RRC_ATTEMPTS):
        target_area = area * rng.uniform(*scale)
        aspect = math.exp(rng.uniform(*log_ratio))
        w = round(math.sqrt(target_area * aspect))
        h = round(math.sqrt(target_area / aspect))
        if 0 < w <= width and 0 < h <= height:
            top = int(rng.integers(0, height - h + 1))
            left = int(rng.integers(0, width - w + 1))
            return left, top, left + w, top + h
    # Fallback: the central crop with the aspect ratio clamped into range.
    w, h = width, height
    if width / height < ratio[0]:
        h = round(w / ratio[0])
    elif width / height > ratio[1]:
        w = round(h * ratio[1])
    top, left = (height - h) // 2, (width - w) // 2
    return left, top, left + w, top + h


def _jitter_box(height, width, size, scales, rng) -> tuple[float, float, float, float]:
    """Short side rescaled to a random size in `scales`, then a random size² crop, as one box."""
    new_w, new_h = output_size(width, height, round(rng.uniform(*scales)))
    top = int(rng.integers(0, new_h - size + 1))
    left = int(rng.integers(0, new_w - size + 1))
    sy, sx = height / new_h, width / new_w
    return left * sx, top * sy, (left + size) * sx, (top + size) * sy


def uniform_crops(clip: np.ndarray, crop_size: int, num_crops: int) -> list[np.ndarray]:
    """PySlowFast's uniform_crop of a (T, H, W, 3) clip: one center crop, or three along the long
    side."""
    height, width = clip.shape[1:3]
    spatial = [1] if num_crops == 1 else [0, 1, 2]
    crops = []
    for spatial_idx in spatial:
        top = math.ceil((height - crop_size) / 2)
        left = math.ceil((width - crop_size) / 2)
        if height > width:
            top = {0: 0, 1: top, 2: height - crop_size}[spatial_idx]
        else:
            left = {0: 0, 1: left, 2: width - crop_size}[spatial_idx]
        crops.append(clip[:, top : top + crop_size, left : left + crop_size])
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
        self.increasing = increasing
        self.ops = _INCREASING_OPS if increasing else _OPS

    def __call__(self, frames: Frames, rng: np.random.Generator) -> Frames:
        for op in rng.choice(len(self.ops), self.num_ops, replace=True):
            if rng.random() > 0.5:
                continue
            magnitude = self.magnitude
            if self.magnitude_std > 0:
                magnitude = rng.normal(magnitude, self.magnitude_std)
            level = min(_MAX_LEVEL, max(0.0, magnitude)) / _MAX_LEVEL
            frames = self.ops[op](frames, level, rng)
        return frames


# An op maps (frames, level in [0, 1], rng) to frames. Its random draws (sign) happen once, before
# the per-frame loop, so every frame gets the same parameters.
Op = Callable[[Frames, float, np.random.Generator], Frames]


def _signed(value: float, rng: np.random.Generator) -> float:
    return -value if rng.random() < 0.5 else value


def _per_frame(fn: Callable[[Image.Image], Image.Image]) -> Op:
    """An op without parameters (autocontrast, equalize, invert)."""
    return lambda frames, level, rng: [fn(frame) for frame in frames]


def _affine(matrix: Callable[[float, np.random.Generator, tuple[int, int]], tuple]) -> Op:
    """Pillow's affine transform; `matrix` maps output to input pixels, about the top-left corner,
    as timm's shear and translate ops use it."""

    def op(frames, level, rng):
        coefficients = matrix(level, rng, frames[0].size)
        return [
            frame.transform(
                frame.size, Image.Transform.AFFINE, coefficients, _BILINEAR, fillcolor=_FILL
            )
            for frame in frames
        ]

    return op


def _rotate(frames, level, rng):
    degrees = _signed(level * 30.0, rng)
    return [frame.rotate(degrees, _BILINEAR, fillcolor=_FILL) for frame in frames]


def _posterize_bits(bits: Callable[[float], int]) -> Op:
    def op(frames, level, rng):
        keep = bits(level)
        if keep >= 8:
            return frames
        if keep <= 0:  # inc1 at magnitude 10: Pillow >= 9 refuses 0 bits, older ones gave black
            return [Image.new(frame.mode, frame.size) for frame in frames]
        return [ImageOps.posterize(frame, keep) for frame in frames]

    return op


def _solarize(threshold: Callable[[float], int]) -> Op:
    # A threshold of 256 leaves every pixel as it is.
    return lambda frames, level, rng: [
        ImageOps.solarize(frame, threshold(level)) for frame in frames
    ]


def _solarize_add(frames, level, rng):
    """timm's SolarizeAdd: add level * 110 to the pixels below 128."""
    added = int(level * 110)
    lut = [min(255, i + added) if i < 128 else i for i in range(256)] * 3
    return [frame.point(lut) for frame in frames]


def _enhance(enhancer: type, factor: Callable[[float, np.random.Generator], float]) -> Op:
    def op(frames, level, rng):
        value = factor(level, rng)
        return [enhancer(frame).enhance(value) for frame in frames]

    return op


def _enhance_factor(level, rng):
    """timm's Color/Contrast/Brightness/Sharpness: factor in [0.1, 1.9] rising with level."""
    return level * 1.8 + 0.1


def _enhance_increasing_factor(level, rng):
    """The inc1 variants: factor 1 +- 0.9 * level, so the change grows with the magnitude."""
    return 1.0 + _signed(level * 0.9, rng)


_COMMON_OPS: list[Op] = [
    _per_frame(ImageOps.autocontrast),
    _per_frame(ImageOps.equalize),
    _per_frame(ImageOps.invert),
    _rotate,
]
_GEOMETRIC_OPS: list[Op] = [
    _affine(lambda level, rng, size: (1, _signed(level * 0.3, rng), 0, 0, 1, 0)),  # shear x
    _affine(lambda level, rng, size: (1, 0, 0, _signed(level * 0.3, rng), 1, 0)),  # shear y
    _affine(lambda level, rng, size: (1, 0, _signed(level * 0.45, rng) * size[0], 0, 1, 0)),
    _affine(lambda level, rng, size: (1, 0, 0, 0, 1, _signed(level * 0.45, rng) * size[1])),
]
_ENHANCERS = (
    ImageEnhance.Color,
    ImageEnhance.Contrast,
    ImageEnhance.Brightness,
    ImageEnhance.Sharpness,
)
# Same order as timm's _RAND_TRANSFORMS / _RAND_INCREASING_TRANSFORMS.
_OPS: list[Op] = [
    *_COMMON_OPS,
    _posterize_bits(lambda level: int(level * 4)),
    _solarize(lambda level: int(level * 256)),
    _solarize_add,
    *(_enhance(enhancer, _enhance_factor) for enhancer in _ENHANCERS),
    *_GEOMETRIC_OPS,
]
_INCREASING_OPS: list[Op] = [
    *_COMMON_OPS,
    _posterize_bits(lambda level: 4 - int(level * 4)),
    _solarize(lambda level: 256 - int(level * 256)),
    _solarize_add,
    *(_enhance(enhancer, _enhance_increasing_factor) for enhancer in _ENHANCERS),
    *_GEOMETRIC_OPS,
]
