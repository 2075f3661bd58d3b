"""AdamW with the release's parameter groups and its warmup + cosine schedule."""

from __future__ import annotations

import math

import torch
from torch import nn


def param_groups(model: nn.Module, weight_decay: float) -> list[dict]:
    """No weight decay on 1-D parameters (norms, biases) and on what the model names
    (`no_weight_decay()`), as the release's ZERO_WD_1D_PARAM does."""
    skip = set(getattr(model, "no_weight_decay", lambda: set())())
    decay, no_decay = [], []
    for name, param in model.named_parameters():
        if not param.requires_grad:
            continue
        if param.ndim <= 1 or name in skip or name.removeprefix("module.") in skip:
            no_decay.append(param)
        else:
            decay.append(param)
    return [
        {"params": decay, "weight_decay": weight_decay},
        {"params": no_decay, "weight_decay": 0.0},
    ]


def build_optimizer(
    model: nn.Module, *, lr: float, weight_decay: float, betas: tuple[float, float]
) -> torch.optim.AdamW:
    # fused kernels where the device supports them; foreach otherwise
    fused = next(model.parameters()).is_cuda
    return torch.optim.AdamW(
        param_groups(model, weight_decay), lr=lr, betas=betas, fused=fused or None
    )


def lr_at(
    step: int,
    *,
    base_lr: float,
    total_steps: int,
    warmup_steps: int,
    warmup_start_lr: float,
    min_lr: float,
) -> float:
    """Linear warmup from `warmup_start_lr` to `base_lr`, then cosine down to `min_lr`.

    The release's COSINE_AFTER_WARMUP: the cosine spans the steps after warmup, so the rate is
    `base_lr` exactly when warmup ends and `min_lr` at the last step.
    """
    if warmup_steps > 0 and step < warmup_steps:
        return warmup_start_lr + (base_lr - warmup_start_lr) * step / warmup_steps
    span = max(1, total_steps - warmup_steps)
    progress = min(1.0, (step - warmup_steps) / span)
    return min_lr + (base_lr - min_lr) * 0.5 * (1.0 + math.cos(math.pi * progress))


def set_lr(optimizer: torch.optim.Optimizer, lr: float) -> None:
    for group in optimizer.param_groups:
        group["lr"] = lr
