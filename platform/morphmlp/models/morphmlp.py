"""MorphMLP (Zhang et al., ECCV 2022, arXiv 2111.12527): the network, top to bottom.

A block is MorphFC_t (temporal) -> MorphFC_s (spatial) -> MLP, each pre-norm. MorphFC_s splits
the channels into L groups and mixes L consecutive tokens of the flattened plane per group with
one FC over (L tokens x C/L channels) = C features: along rows (W), along columns (H, i.e. after
transposing the plane) and over channels; softmax weights from the pooled sum pick a per-channel
mix of the branches. L grows by stage, so the receptive field grows from local to global.

Parameter names and shapes equal the reference release's (github MTLab/MorphMLP,
slowfast/models/morphmlp.py and morphmlp_32.py), so its checkpoints load with strict=True, and
with the same weights the outputs match it. Activations are kept as (B, T, H, W, C).

Every chunked FC here is one view of the activation, one permuted copy, one matmul and one copy
back (`_chunk_fc`); the release's permute/reshape chains make up to three copies per branch.
"""

from __future__ import annotations

import dataclasses

import torch
from torch import Tensor, nn
from torch.utils.checkpoint import checkpoint

from morphmlp.models.variants import MorphMLPConfig

Plan = tuple[tuple[int, ...], tuple[int, ...]]  # (view shape, permutation): see _chunk_fc


def _chunk_fc(x: Tensor, fc: nn.Linear, plan: Plan) -> Tensor:
    """Apply `fc` to every chunk of tokens within every channel group of `x`.

    `x.reshape(split).permute(perm)` must order the dims as rows first (batch, chunk, group)
    and the chunk's features last (its tokens, then the group's channels), so that flattening
    the features gives exactly the release's (token, channel) order for the FC.
    """
    split, perm = plan
    chunks = x.reshape(split).permute(perm)  # a view: inputs are contiguous norm outputs
    y = fc(chunks.reshape(-1, fc.in_features))
    inverse = tuple(sorted(range(len(perm)), key=perm.__getitem__))
    return y.view(chunks.shape).permute(inverse).reshape(x.shape)


def _row_plan(height: int, width: int, length: int, channels: int) -> Plan:
    """Chunks of `length` consecutive tokens of the row-major plane (the W branch)."""
    groups, per_group = length, channels // length
    return (-1, height * width // length, length, groups, per_group), (0, 1, 3, 2, 4)


def _column_plan(height: int, width: int, length: int, channels: int) -> Plan | None:
    """Chunks of consecutive tokens of the column-major plane (the H branch), as a view of the
    row-major activation: possible when a chunk is part of one column or whole columns."""
    groups, per_group = length, channels // length
    if height % length == 0:  # (n, h1, l, w, g, s): a chunk is l = 0..L-1 of column w, block h1
        return (-1, height // length, length, width, groups, per_group), (0, 3, 1, 4, 2, 5)
    if length % height == 0:  # (n, h, w1, k, g, s): a chunk is k whole columns, token = k*H + h
        k = length // height
        return (-1, height, width // k, k, groups, per_group), (0, 2, 4, 3, 1, 5)
    return None


class Mlp(nn.Module):
    def __init__(self, in_features: int, hidden_features: int, out_features: int | None = None):
        super().__init__()
        self.fc1 = nn.Linear(in_features, hidden_features)
        self.act = nn.GELU()
        self.fc2 = nn.Linear(hidden_features, out_features or in_features)

    def forward(self, x: Tensor) -> Tensor:
        return self.fc2(self.act(self.fc1(x)))


class MorphFCs(nn.Module):
    """Spatial token mixing with chunk length L (the release's MorphFC_S and, in the last stage,
    MorphFC_S2). The last stage has an H branch and a channel branch only; its chunks take every
    (H*W/L)-th token of the flattened plane, which at the release's sizes is the whole plane."""

    def __init__(self, dim: int, plane: tuple[int, int], length: int, bias: bool, last: bool):
        super().__init__()
        height, width = plane
        self.mlp_h = nn.Linear(dim, dim, bias=bias)
        self.mlp_w = None if last else nn.Linear(dim, dim, bias=bias)
        self.mlp_c = nn.Linear(dim, dim, bias=bias)
        self.num_branches = 2 if last else 3
        self.reweight = Mlp(dim, dim // 4, dim * self.num_branches)
        self.proj = nn.Linear(dim, dim)

        self.w_plan = _row_plan(height, width, length, dim)
        if last:  # token p = i * (HW/L) + j belongs to chunk j at position i
            stride = height * width // length
            self.h_plan = (-1, length, stride, length, dim // length), (0, 2, 3, 1, 4)
        else:
            self.h_plan = _column_plan(height, width, length, dim)

    def forward(self, x: Tensor) -> Tensor:
        if self.h_plan is not None:
            h = _chunk_fc(x, self.mlp_h, self.h_plan)
        else:  # chunks straddle columns unevenly: materialise the transposed plane first
            h = _chunk_fc(x.transpose(2, 3).contiguous(), self.mlp_h, self.w_plan).transpose(2, 3)
        c = self.mlp_c(x)
        branches = [h, c] if self.mlp_w is None else [h, _chunk_fc(x, self.mlp_w, self.w_plan), c]

        batch, channels = x.shape[0], x.shape[-1]
        pooled = sum(b.mean(dim=(1, 2, 3)) for b in branches)  # = mean of the sum, no temporary
        # The reweight output is read as (C, branch), as in the release.
        weights = self.reweight(pooled).view(batch, channels, self.num_branches).softmax(-1)
        weights = weights.permute(2, 0, 1)[:, :, None, None, None, :]
        out = branches[0] * weights[0]
        for branch, weight in zip(branches[1:], weights[1:], strict=True):
            out.addcmul_(branch, weight)
        return self.proj(out)


class MorphFCt(nn.Module):
    """Temporal mixing: at each location, channels split into `groups`; one FC mixes all T
    temporal tokens of a group, over (T x C/groups) features."""

    def __init__(self, dim: int, grid: tuple[int, int, int], groups: int, bias: bool):
        super().__init__()
        frames, height, width = grid
        features = frames * (dim // groups)
        self.mlp_t = nn.Linear(features, features, bias=bias)
        self.proj = nn.Linear(dim, dim)
        self.plan = (-1, frames, height * width, groups, dim // groups), (0, 2, 3, 1, 4)

    def forward(self, x: Tensor) -> Tensor:
        return self.proj(_chunk_fc(x, self.mlp_t, self.plan))


class DropPath(nn.Module):
    """Stochastic depth: drop the residual branch per sample, rescale the kept ones."""

    def __init__(self, p: float):
        super().__init__()
        self.p = p

    def forward(self, x: Tensor) -> Tensor:
        if not self.training or self.p == 0.0:
            return x
        keep = 1.0 - self.p
        mask = x.new_empty((x.shape[0],) + (1,) * (x.ndim - 1)).bernoulli_(keep)
        return x * mask.div_(keep)


class MorphBlock(nn.Module):
    def __init__(
        self,
        dim: int,
        grid: tuple[int, int, int],
        length: int,
        temporal_groups: int | None,
        mlp_ratio: float,
        bias: bool,
        drop_path: float,
        last: bool,
    ):
        super().__init__()
        if temporal_groups is not None:
            self.t_norm1 = nn.LayerNorm(dim)
            self.t_fc = MorphFCt(dim, grid, temporal_groups, bias)
        else:
            self.t_fc = None
        self.norm1 = nn.LayerNorm(dim)
        self.fc = MorphFCs(dim, grid[1:], length, bias, last)
        self.drop_path = DropPath(drop_path)
        self.norm2 = nn.LayerNorm(dim)
        self.mlp = Mlp(dim, int(dim * mlp_ratio))

    def forward(self, x: Tensor) -> Tensor:
        # The temporal residual feeds only the spatial branch's input, not the block's stream.
        xt = x if self.t_fc is None else x + self.t_fc(self.t_norm1(x))
        x = x + self.drop_path(self.fc(self.norm1(xt)))
        return x + self.drop_path(self.mlp(self.norm2(x)))


class Stem(nn.Module):
    """Conv k3 s2 (time and space) -> BN -> GELU -> conv k(1,3,3) s(1,2,2) -> BN; 2-D for images."""

    def __init__(self, in_chans: int, dim: int, video: bool):
        super().__init__()
        if video:
            self.proj1 = nn.Conv3d(in_chans, dim // 2, 3, 2, 1)
            self.norm1 = nn.BatchNorm3d(dim // 2)
            self.proj2 = nn.Conv3d(dim // 2, dim, (1, 3, 3), (1, 2, 2), (0, 1, 1))
            self.norm2 = nn.BatchNorm3d(dim)
        else:
            self.proj1 = nn.Conv2d(in_chans, dim // 2, 3, 2, 1)
            self.norm1 = nn.BatchNorm2d(dim // 2)
            self.proj2 = nn.Conv2d(dim // 2, dim, 3, 2, 1)
            self.norm2 = nn.BatchNorm2d(dim)
        self.act = nn.GELU()

    def forward(self, x: Tensor) -> Tensor:
        x = self.norm2(self.proj2(self.act(self.norm1(self.proj1(x)))))
        # (B, C, T, H, W) or (B, C, H, W) -> (B, T, H, W, C) with T = 1 for images; contiguous,
        # else every residual add downstream would keep the channels-first layout.
        x = x.movedim(1, -1).contiguous()
        return x if x.ndim == 5 else x.unsqueeze(1)


class Downsample(nn.Module):
    """Between stages: conv k(1,3,3) s(1,2,2) -> LayerNorm, frame by frame."""

    def __init__(self, in_dim: int, out_dim: int, video: bool):
        super().__init__()
        if video:
            self.proj = nn.Conv3d(in_dim, out_dim, (1, 3, 3), (1, 2, 2), (0, 1, 1))
        else:
            self.proj = nn.Conv2d(in_dim, out_dim, 3, 2, 1)
        self.norm = nn.LayerNorm(out_dim)

    def forward(self, x: Tensor) -> Tensor:
        x = x.movedim(-1, 1)  # (B, C, T, H, W)
        x = self.proj(x) if isinstance(self.proj, nn.Conv3d) else self.proj(x[:, :, 0])[:, :, None]
        return self.norm(x.movedim(1, -1))


class MorphMLP(nn.Module):
    """Video (or, with num_frames == 1, image) classifier. Input: float (B, C, T, H, W), or
    (B, C, H, W) for an image model; output: logits (B, num_classes)."""

    def __init__(self, cfg: MorphMLPConfig):
        super().__init__()
        self.cfg = cfg
        self.grad_checkpointing = False
        video = not cfg.is_image
        groups = cfg.resolved_temporal_groups or (None,) * cfg.num_stages
        # stochastic depth grows linearly over all blocks (plain floats: works on the meta device)
        total = sum(cfg.depths)
        rates = [cfg.drop_path_rate * i / max(total - 1, 1) for i in range(total)]

        self.patch_embed1 = Stem(cfg.in_chans, cfg.widths[0], video)
        for i, (depth, dim, grid) in enumerate(zip(cfg.depths, cfg.widths, cfg.grids, strict=True)):
            if i > 0:
                self.add_module(f"patch_embed{i + 1}", Downsample(cfg.widths[i - 1], dim, video))
            first = sum(cfg.depths[:i])
            blocks = [
                MorphBlock(
                    dim,
                    grid,
                    cfg.chunk_lengths[i],
                    groups[i],
                    cfg.mlp_ratio,
                    cfg.bias,
                    drop_path=rates[first + j],
                    last=i == cfg.num_stages - 1,
                )
                for j in range(depth)
            ]
            self.add_module(f"blocks{i + 1}", nn.ModuleList(blocks))
        self.norm = nn.LayerNorm(cfg.widths[-1])
        self.head = self._new_head(cfg.num_classes)
        self.apply(_init_weights)
        for m in self.modules():
            if isinstance(m, MorphFCt):
                _init_temporal(m, cfg.temporal_init)

    def _new_head(self, num_classes: int) -> nn.Module:
        return nn.Linear(self.cfg.widths[-1], num_classes) if num_classes > 0 else nn.Identity()

    def forward_features(self, x: Tensor) -> Tensor:
        """Normalised token grid of the last stage, (B, T', H', W', C)."""
        self._check_input(x)
        x = self.patch_embed1(x)
        for i in range(self.cfg.num_stages):
            if i > 0:
                x = getattr(self, f"patch_embed{i + 1}")(x)
            for block in getattr(self, f"blocks{i + 1}"):
                if self.grad_checkpointing and torch.is_grad_enabled():
                    x = checkpoint(block, x, use_reentrant=False)
                else:
                    x = block(x)
        return self.norm(x)

    def forward_head(self, x: Tensor, pre_logits: bool = False) -> Tensor:
        x = x.mean(dim=(1, 2, 3))
        return x if pre_logits else self.head(x)

    def forward(self, x: Tensor) -> Tensor:
        return self.forward_head(self.forward_features(x))

    def reset_classifier(self, num_classes: int) -> None:
        """A fresh head for `num_classes` outputs (0: none, the model returns pooled features)."""
        self.cfg = dataclasses.replace(self.cfg, num_classes=num_classes)
        ref = self.norm.weight
        self.head = self._new_head(num_classes).to(device=ref.device, dtype=ref.dtype)
        self.head.apply(_init_weights)

    def set_grad_checkpointing(self, enable: bool = True) -> None:
        """Recompute each block's activations in backward instead of storing them."""
        self.grad_checkpointing = enable

    def no_weight_decay(self) -> set[str]:
        """Norm weights and biases: the release trains with ZERO_WD_1D_PARAM."""
        return {name for name, p in self.named_parameters() if p.ndim <= 1}

    def _check_input(self, x: Tensor) -> None:
        cfg = self.cfg
        size = (cfg.img_size, cfg.img_size)
        expected = (cfg.in_chans, *size) if cfg.is_image else (cfg.in_chans, cfg.num_frames, *size)
        if tuple(x.shape[1:]) != expected:
            layout = "(B, C, H, W)" if cfg.is_image else "(B, C, T, H, W)"
            raise ValueError(
                f"input of shape {tuple(x.shape)} does not fit this model: expected {layout} = "
                f"(B, {', '.join(map(str, expected))}); the model is built for num_frames="
                f"{cfg.num_frames} and img_size={cfg.img_size}"
            )


def _init_weights(m: nn.Module) -> None:
    # The release's scheme: truncated normal for linear layers, unit/zero norms, torch's default
    # for convs and batch norms. The temporal FC is set afterwards by `_init_temporal`.
    if isinstance(m, nn.Linear):
        nn.init.trunc_normal_(m.weight, std=0.02)
        if m.bias is not None:
            nn.init.zeros_(m.bias)
    elif isinstance(m, nn.LayerNorm):
        nn.init.ones_(m.weight)
        nn.init.zeros_(m.bias)


def _init_temporal(m: MorphFCt, mode: str) -> None:
    # Either way the branch outputs 0 at first (see MorphMLPConfig.temporal_init for why two).
    if mode == "release":  # mlp_t = 0, proj weight = 1
        nn.init.zeros_(m.mlp_t.weight)
        nn.init.ones_(m.proj.weight)
    else:  # "zero_proj": mlp_t keeps its trunc-normal weights, proj = 0
        nn.init.zeros_(m.proj.weight)
    if m.mlp_t.bias is not None:
        nn.init.zeros_(m.mlp_t.bias)
    if m.proj.bias is not None:
        nn.init.zeros_(m.proj.bias)


def build_model(cfg: MorphMLPConfig) -> MorphMLP:
    return MorphMLP(cfg)
