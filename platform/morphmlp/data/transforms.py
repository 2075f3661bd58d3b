"""Batched transforms on the training worker (its GPU when it has one), after the uint8 clips
arrive: normalisation, random erasing, Mixup/CutMix with label smoothing. Same parameters as the
release (timm's RandomErasing in pixel mode with one box per clip shared by all frames; timm's
batch Mixup pairing each sample with the batch reversed). Randomness comes from `generator`
(a torch.Generator) when given, so a seeded run is reproducible.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np
import torch

from morphmlp.data.config import DataConfig


def prepare_clips(
    clips: torch.Tensor, cfg: DataConfig, generator: torch.Generator | None = None
) -> torch.Tensor:
    """What the training worker does to a uint8 (B, T, H, W, 3) batch before Mixup/CutMix:
    RandAugment when data.augment_on is "worker" (one draw per clip), normalisation, random
    erasing. Returns float32 (B, 3, T, H, W)."""
    if cfg.augment_on == "worker" and cfg.rand_augment:
        from morphmlp.data.worker_augment import rand_augment

        clips = rand_augment(clips, cfg.rand_augment, generator)
    x = normalize(clips, cfg.mean, cfg.std)
    if cfg.random_erasing > 0:
        x = random_erasing(x, cfg.random_erasing, generator=generator)
    return x


def normalize(clips: torch.Tensor, mean: Sequence[float], std: Sequence[float]) -> torch.Tensor:
    """uint8 (B, T, H, W, 3) -> float32 (B, 3, T, H, W), scaled to [0, 1] then standardised."""
    if clips.dtype != torch.uint8 or clips.ndim != 5 or clips.shape[-1] != 3:
        raise ValueError(
            f"expected uint8 clips of shape (B, T, H, W, 3), got {clips.dtype} {tuple(clips.shape)}"
        )
    x = clips.permute(0, 4, 1, 2, 3).float().div_(255.0)
    mean_t = torch.as_tensor(mean, dtype=x.dtype, device=x.device).view(1, 3, 1, 1, 1)
    std_t = torch.as_tensor(std, dtype=x.dtype, device=x.device).view(1, 3, 1, 1, 1)
    return x.sub_(mean_t).div_(std_t)


def random_erasing(
    x: torch.Tensor,
    p: float,
    generator: torch.Generator | None = None,
    *,
    min_area: float = 0.02,
    max_area: float = 1 / 3,
    min_aspect: float = 0.3,
) -> torch.Tensor:
    """Erase one random box per clip with probability p, in place, filled with N(0, 1) noise.

    x is a normalised (B, C, T, H, W) batch. The box is the same on every frame of a clip (the
    release's "cube" mode), the noise differs per pixel and frame (mode "pixel").
    """
    if p <= 0:
        return x
    rng = _numpy_rng(generator)
    _, channels, frames, height, width = x.shape
    log_aspect = (math.log(min_aspect), math.log(1 / min_aspect))
    for i in range(x.shape[0]):
        if rng.random() > p:
            continue
        for _ in range(100):
            area = rng.uniform(min_area, max_area) * height * width
            aspect = math.exp(rng.uniform(*log_aspect))
            h = round(math.sqrt(area * aspect))
            w = round(math.sqrt(area / aspect))
            if w < width and h < height:
                top = int(rng.integers(0, height - h + 1))
                left = int(rng.integers(0, width - w + 1))
                noise = torch.randn(
                    (channels, frames, h, w), generator=generator, device=_device(generator, x)
                )
                x[i, :, :, top : top + h, left : left + w] = noise.to(x.device, x.dtype)
                break
    return x


def mixup_cutmix(
    x: torch.Tensor,
    labels: torch.Tensor,
    num_classes: int,
    *,
    mixup_alpha: float = 0.8,
    cutmix_alpha: float = 1.0,
    prob: float = 1.0,
    switch_prob: float = 0.5,
    label_smoothing: float = 0.1,
    generator: torch.Generator | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Batch Mixup or CutMix (one lambda per batch, each sample paired with the reversed batch).

    x: (B, C, T, H, W), modified in place; labels: (B,) int. Returns x and soft targets (B,
    num_classes) with label smoothing. CutMix cuts the same box from every frame and corrects
    lambda to the box's clipped area.
    """
    rng = _numpy_rng(generator)
    lam, use_cutmix = 1.0, False
    if rng.random() < prob and (mixup_alpha > 0 or cutmix_alpha > 0):
        if mixup_alpha > 0 and cutmix_alpha > 0:
            use_cutmix = rng.random() < switch_prob
        else:
            use_cutmix = cutmix_alpha > 0
        alpha = cutmix_alpha if use_cutmix else mixup_alpha
        lam = float(rng.beta(alpha, alpha))
    if lam < 1.0:
        if use_cutmix:
            height, width = x.shape[-2:]
            ratio = math.sqrt(1 - lam)
            cut_h, cut_w = int(height * ratio), int(width * ratio)
            cy, cx = int(rng.integers(0, height)), int(rng.integers(0, width))
            y0, y1 = np.clip([cy - cut_h // 2, cy + cut_h // 2], 0, height)
            x0, x1 = np.clip([cx - cut_w // 2, cx + cut_w // 2], 0, width)
            x[..., y0:y1, x0:x1] = x.flip(0)[..., y0:y1, x0:x1]
            lam = 1.0 - float((y1 - y0) * (x1 - x0)) / (height * width)
        else:
            flipped = x.flip(0).mul_(1.0 - lam)  # flip copies: taken before x changes
            x.mul_(lam).add_(flipped)
    off = label_smoothing / num_classes
    on = 1.0 - label_smoothing + off
    one_hot = torch.full((labels.shape[0], num_classes), off, device=x.device)
    one_hot.scatter_(1, labels.long().view(-1, 1).to(x.device), on)
    return x, one_hot * lam + one_hot.flip(0) * (1.0 - lam)


def _numpy_rng(generator: torch.Generator | None) -> np.random.Generator:
    """Parameter draws (Beta, boxes) in numpy, seeded from the torch generator (or torch's RNG)."""
    device = generator.device if generator is not None else "cpu"
    seed = torch.randint(0, 2**62, (1,), generator=generator, device=device).item()
    return np.random.default_rng(seed)


def _device(generator: torch.Generator | None, x: torch.Tensor) -> torch.device:
    return generator.device if generator is not None else x.device
