"""RandAugment on the training worker (its GPU when it has one), in plain torch ops, for
data.augment_on = "worker": the decode actors stop at decode, resize, crop and flip, and the
per-pixel work runs here on the uint8 batch (B, T, H, W, 3) before normalisation and erasing.

Same policy as the Pillow path in augment.py (timm's `rand-m7-n4-mstd0.5-inc1` as the release uses
it), and the same draws in the same order from a numpy Generator, so that a clip given the same
Generator gets the same ops, magnitudes and signs on either path (tests/test_data_worker_augment.py
compares the two). One set of draws per clip, applied to all its frames. The kernels follow
Pillow's definitions (the L weights, the SMOOTH kernel, the blend, the LUTs of autocontrast,
equalize and posterize, the fill of geometric ops) in float32 with a rounding back to integers after
every op, as Pillow's uint8 images are; results differ from Pillow's by interpolation rounding only.

Why not kornia 0.9: its RandAugment has its own policy (no "increasing" variants, no SolarizeAdd,
no magnitude std, per-batch rather than per-clip ops for videos), so matching the release would
mean writing the ops anyway; torchvision.transforms.v2.RandAugment likewise has torchvision's
policy. Plain torch also keeps the dependency list as it is.
"""

from __future__ import annotations

import math

import numpy as np
import torch
import torch.nn.functional as F

from morphmlp.data.augment import _MAX_LEVEL, RandAugment

_FILL = 128.0  # timm's fill colour for geometric ops (grey on every channel)
# Pillow's RGB -> L weights (ITU-R 601-2 luma, in 16-bit fixed point).
_L_WEIGHTS = (19595, 38470, 7471)
_SMOOTH = torch.tensor([[1.0, 1.0, 1.0], [1.0, 5.0, 1.0], [1.0, 1.0, 1.0]]) / 13.0


def rand_augment(
    clips: torch.Tensor, spec: str, generator: torch.Generator | None = None
) -> torch.Tensor:
    """uint8 (B, T, H, W, 3) -> uint8 (B, T, H, W, 3): RandAugment `spec` with one draw per clip.

    The draws come from a numpy Generator seeded from `generator` (as transforms.random_erasing
    does), so a seeded step is reproducible.
    """
    if clips.dtype != torch.uint8 or clips.ndim != 5 or clips.shape[-1] != 3:
        raise ValueError(
            f"expected uint8 clips of shape (B, T, H, W, 3), got {clips.dtype} {tuple(clips.shape)}"
        )
    policy = RandAugment(spec)
    ops = _INCREASING_OPS if policy.increasing else _OPS
    rng = _numpy_rng(generator, clips.device)
    out = []
    for clip in clips:
        x = clip.permute(0, 3, 1, 2).float()  # (T, 3, H, W) in [0, 255]
        for op, level, sign in plan(policy, ops, rng):
            x = ops[op][0](x, level, sign)
        out.append(x.permute(0, 2, 3, 1))
    return torch.stack(out).to(torch.uint8)


def plan(
    policy: RandAugment, ops: list, rng: np.random.Generator
) -> list[tuple[int, float, float]]:
    """(op, level, sign) of one clip, drawn exactly as augment.RandAugment draws them: op
    indices, then per op the apply coin, the magnitude and (signed ops only) the sign coin."""
    steps = []
    for op in rng.choice(len(ops), policy.num_ops, replace=True):
        if rng.random() > 0.5:
            continue
        magnitude = policy.magnitude
        if policy.magnitude_std > 0:
            magnitude = rng.normal(magnitude, policy.magnitude_std)
        level = min(_MAX_LEVEL, max(0.0, magnitude)) / _MAX_LEVEL
        signed = ops[op][1]
        sign = -1.0 if signed and rng.random() < 0.5 else 1.0
        steps.append((int(op), level, sign))
    return steps


def _numpy_rng(generator: torch.Generator | None, device: torch.device) -> np.random.Generator:
    where = generator.device if generator is not None else device
    seed = torch.randint(0, 2**62, (1,), generator=generator, device=where).item()
    return np.random.default_rng(seed)


# -- the ops: (T, 3, H, W) float32 with integer values in [0, 255] -> the same ----------------


def _quantise(x: torch.Tensor) -> torch.Tensor:
    """Back to uint8 values, as Pillow stores every intermediate image (truncating, as its
    blend does)."""
    return x.clamp_(0, 255).floor_()


def _luma(x: torch.Tensor) -> torch.Tensor:
    """Pillow's convert("L"): (T, 1, H, W)."""
    r, g, b = x[:, 0:1], x[:, 1:2], x[:, 2:3]
    return torch.floor((r * _L_WEIGHTS[0] + g * _L_WEIGHTS[1] + b * _L_WEIGHTS[2] + 0x8000) / 65536)


def _blend(degenerate: torch.Tensor, x: torch.Tensor, factor: float) -> torch.Tensor:
    """Pillow's ImageEnhance: degenerate + factor * (image - degenerate)."""
    return _quantise(degenerate + factor * (x - degenerate))


def _lut(x: torch.Tensor, table: torch.Tensor) -> torch.Tensor:
    """Apply per-(frame, channel) lookup tables (T, 3, 256) to x."""
    t, c, h, w = x.shape
    idx = x.long().view(t, c, h * w)
    return torch.gather(table, 2, idx).view(t, c, h, w).to(x.dtype)


def _autocontrast(x, level, sign):
    flat = x.flatten(2)
    lo, hi = flat.amin(2, keepdim=True), flat.amax(2, keepdim=True)
    scale = 255.0 / (hi - lo).clamp(min=1)
    stretched = _quantise(flat * scale - lo * scale)  # Pillow: int(i * scale + offset)
    return torch.where(hi > lo, stretched, flat).view_as(x)


def _equalize(x, level, sign):
    t, c = x.shape[:2]
    idx = x.long().view(t, c, -1)
    hist = torch.zeros(t, c, 256, device=x.device, dtype=torch.long)
    hist.scatter_add_(2, idx, torch.ones_like(idx))
    # Pillow: step = (pixels - count of the last non-empty bin) // 255; lut[i] = (step // 2 +
    # pixels below i) // step; no change where step is 0 (at most one grey level).
    bins = torch.arange(256, device=x.device)
    last = torch.where(hist > 0, bins, -1).amax(2, keepdim=True)
    step = (hist.sum(2, keepdim=True) - torch.gather(hist, 2, last)) // 255
    below = torch.cumsum(hist, 2) - hist
    table = ((step // 2 + below) // step.clamp(min=1)).clamp_(max=255)
    table = torch.where(step > 0, table, bins.expand_as(table))
    return _lut(x, table)


def _invert(x, level, sign):
    return 255.0 - x


def _rotate(x, level, sign):
    # Pillow's rotate: about the centre, counter-clockwise, as an output->input affine map.
    height, width = x.shape[-2:]
    angle = -math.radians(sign * level * 30.0)
    a, b = round(math.cos(angle), 15), round(math.sin(angle), 15)
    d, e = -b, a
    cx, cy = width / 2.0, height / 2.0
    c = a * -cx + b * -cy + cx
    f = d * -cx + e * -cy + cy
    return _affine(x, (a, b, c, d, e, f))


def _shear_x(x, level, sign):
    return _affine(x, (1, sign * level * 0.3, 0, 0, 1, 0))


def _shear_y(x, level, sign):
    return _affine(x, (1, 0, 0, sign * level * 0.3, 1, 0))


def _translate_x(x, level, sign):
    return _affine(x, (1, 0, sign * level * 0.45 * x.shape[-1], 0, 1, 0))


def _translate_y(x, level, sign):
    return _affine(x, (1, 0, 0, 0, 1, sign * level * 0.45 * x.shape[-2]))


def _affine(x: torch.Tensor, coefficients: tuple) -> torch.Tensor:
    """Pillow's Transform.AFFINE: output pixel centre (u, v) reads input (a u + b v + c,
    d u + e v + f), bilinearly; points outside the input get the fill colour."""
    a, b, c, d, e, f = (float(k) for k in coefficients)
    t, _, height, width = x.shape
    v, u = torch.meshgrid(
        torch.arange(height, device=x.device, dtype=x.dtype) + 0.5,
        torch.arange(width, device=x.device, dtype=x.dtype) + 0.5,
        indexing="ij",
    )
    xin, yin = a * u + b * v + c, d * u + e * v + f
    grid = torch.stack((2 * xin / width - 1, 2 * yin / height - 1), dim=-1)
    sampled = F.grid_sample(
        x,
        grid.expand(t, height, width, 2),
        mode="bilinear",
        padding_mode="border",
        align_corners=False,
    )
    inside = (xin >= 0) & (xin < width) & (yin >= 0) & (yin < height)
    return torch.where(inside, sampled.round_(), torch.full_like(sampled, _FILL))


def _posterize(bits_of):
    def op(x, level, sign):
        bits = bits_of(level)
        if bits >= 8:
            return x
        drop = 2 ** (8 - bits)
        return torch.div(x, drop, rounding_mode="floor") * drop

    return op


def _solarize(threshold_of):
    def op(x, level, sign):
        return torch.where(x < threshold_of(level), x, 255.0 - x)

    return op


def _solarize_add(x, level, sign):
    added = int(level * 110)
    return torch.where(x < 128, (x + added).clamp_(max=255), x)


def _factor(level, sign):
    return level * 1.8 + 0.1


def _increasing_factor(level, sign):
    return 1.0 + sign * level * 0.9


def _color(factor_of):
    return lambda x, level, sign: _blend(_luma(x).expand_as(x), x, factor_of(level, sign))


def _contrast(factor_of):
    def op(x, level, sign):
        mean = torch.floor(_luma(x).mean(dim=(1, 2, 3), keepdim=True) + 0.5)  # per frame
        return _blend(mean.expand_as(x), x, factor_of(level, sign))

    return op


def _brightness(factor_of):
    return lambda x, level, sign: _blend(torch.zeros_like(x), x, factor_of(level, sign))


def _sharpness(factor_of):
    def op(x, level, sign):
        t, c, h, w = x.shape
        kernel = _SMOOTH.to(x.device, x.dtype).view(1, 1, 3, 3)
        smooth = F.conv2d(x.reshape(t * c, 1, h, w), kernel).view(t, c, h - 2, w - 2)
        degenerate = x.clone()  # Pillow's SMOOTH leaves the border pixels as they are
        degenerate[..., 1:-1, 1:-1] = torch.floor(smooth + 0.5)
        return _blend(degenerate, x, factor_of(level, sign))

    return op


# (op, draws a sign) in timm's order, as augment._OPS / augment._INCREASING_OPS.
def _table(posterize_bits, solarize_threshold, factor, factor_signed):
    return [
        (_autocontrast, False),
        (_equalize, False),
        (_invert, False),
        (_rotate, True),
        (_posterize(posterize_bits), False),
        (_solarize(solarize_threshold), False),
        (_solarize_add, False),
        (_color(factor), factor_signed),
        (_contrast(factor), factor_signed),
        (_brightness(factor), factor_signed),
        (_sharpness(factor), factor_signed),
        (_shear_x, True),
        (_shear_y, True),
        (_translate_x, True),
        (_translate_y, True),
    ]


_OPS = _table(lambda level: int(level * 4), lambda level: int(level * 256), _factor, False)
_INCREASING_OPS = _table(
    lambda level: 4 - int(level * 4),
    lambda level: 256 - int(level * 256),
    _increasing_factor,
    True,
)
