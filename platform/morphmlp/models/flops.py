"""Parameter and multiply-accumulate counts, computed on the meta device (no memory, no time).

GMACs = FLOPs / 2 from torch's FlopCounterMode, which counts the matmuls and convolutions
(norms, activations and softmax are not counted, as in the release's and the paper's figures).
"""

from __future__ import annotations

import torch

from morphmlp.models.morphmlp import MorphMLP, build_model
from morphmlp.models.variants import MorphMLPConfig


def count_params(model_or_cfg: MorphMLP | MorphMLPConfig) -> int:
    if isinstance(model_or_cfg, MorphMLPConfig):
        with torch.device("meta"):
            model_or_cfg = build_model(model_or_cfg)
    return sum(p.numel() for p in model_or_cfg.parameters())


def forward_flops(model_or_cfg: MorphMLP | MorphMLPConfig, batch_size: int = 1) -> int:
    """FLOPs of one forward pass over `batch_size` clips at the config's input size."""
    cfg = model_or_cfg.cfg if isinstance(model_or_cfg, MorphMLP) else model_or_cfg
    with torch.device("meta"):
        model = build_model(cfg).eval()
        x = torch.empty(batch_size, *input_shape(cfg))
    # Imported here: torch's flop counter loads triton (70 MiB resident), which only this needs.
    from torch.utils.flop_counter import FlopCounterMode

    counter = FlopCounterMode(display=False)
    with counter, torch.no_grad():
        model(x)
    return counter.get_total_flops()


def count_gmacs(model_or_cfg: MorphMLP | MorphMLPConfig, batch_size: int = 1) -> float:
    """Giga multiply-accumulates of one forward pass (per clip when batch_size is 1)."""
    return forward_flops(model_or_cfg, batch_size) / 2e9


def input_shape(cfg: MorphMLPConfig) -> tuple[int, ...]:
    """Shape of one input sample: (C, T, H, W), or (C, H, W) for an image model."""
    size = (cfg.img_size, cfg.img_size)
    return (cfg.in_chans, *size) if cfg.is_image else (cfg.in_chans, cfg.num_frames, *size)
