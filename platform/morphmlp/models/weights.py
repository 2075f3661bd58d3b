"""Loading MorphMLP weights: the release's files and ours, strictly, from any URI.

The release loads its pretrained files with strict=False, which silently hid a checkpoint that
did not fit (MTLab/MorphMLP issue 4). Here any mismatch other than a classifier of a different
size is an error that lists what is missing, unexpected or mis-shaped.
"""

from __future__ import annotations

import io
import logging
import pickle
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Literal

import torch
from torch import Tensor, nn

from morphmlp.errors import ConfigError, MorphMLPError

log = logging.getLogger(__name__)

# Where training frameworks keep the weights inside a checkpoint file: PySlowFast (the
# release) uses model_state; others use model or state_dict.
_WRAPPER_KEYS = ("model_state", "model", "state_dict")
_HEAD_KEYS = ("head.weight", "head.bias")
_MAX_LISTED = 12

Inflation = Literal["center", "mean"]


class CheckpointError(MorphMLPError):
    """A checkpoint that can't be read or doesn't fit the model."""


@dataclass
class LoadReport:
    """What `load_checkpoint` did; with strict=True missing and unexpected are always empty."""

    source: str
    head_reset: bool = False
    missing: list[str] = field(default_factory=list)
    unexpected: list[str] = field(default_factory=list)
    mis_shaped: list[str] = field(default_factory=list)


def read_state_dict(uri: str) -> dict[str, Tensor]:
    """The model weights in a checkpoint file, unwrapped and without DDP's `module.` prefix."""
    from morphmlp import storage  # pyarrow loads only when a file is read

    source = storage.redact(uri)
    return unwrap_state_dict(torch_load(storage.read_bytes(uri), source), source=source)


def torch_load(data: bytes, source: str) -> object:
    """A checkpoint file's object, loaded weights-only (no code runs) onto the CPU."""
    try:
        return torch.load(io.BytesIO(data), map_location="cpu", weights_only=True)
    except (pickle.UnpicklingError, RuntimeError, EOFError) as err:
        raise CheckpointError(
            f"{source}: not a readable weights-only torch checkpoint ({err})"
        ) from err


def unwrap_state_dict(obj: object, source: str = "checkpoint") -> dict[str, Tensor]:
    while isinstance(obj, Mapping):
        wrapper = next((k for k in _WRAPPER_KEYS if isinstance(obj.get(k), Mapping)), None)
        if wrapper is None:
            break
        obj = obj[wrapper]
    if not isinstance(obj, Mapping) or not obj:
        raise CheckpointError(f"{source}: expected a state dict (name -> tensor), got {obj!r:.80}")
    not_tensors = [k for k, v in obj.items() if not isinstance(v, Tensor)]
    if not_tensors:
        raise CheckpointError(
            f"{source}: no state dict found: {_listing(not_tensors)} are not tensors "
            f"(weights are looked for under {', '.join(_WRAPPER_KEYS)} or at the top level)"
        )
    return {k.removeprefix("module."): v for k, v in obj.items()}


def load_checkpoint(
    model: nn.Module,
    checkpoint: str | Mapping[str, Tensor],
    *,
    strict: bool = True,
    inflate: Inflation | None = None,
) -> LoadReport:
    """Load weights from a URI or a state dict into `model`.

    A classifier of a different size (another class count) is left freshly initialised. Any
    other mismatch raises CheckpointError listing the keys, unless strict=False, which loads the
    tensors that fit and reports the rest. An image checkpoint goes into a video model only with
    `inflate` ("center" or "mean", see `inflate_image_checkpoint`); a video checkpoint ignores it.
    """
    if isinstance(checkpoint, str):
        from morphmlp.storage import redact

        source = redact(checkpoint)
        state = read_state_dict(checkpoint)
    else:
        source = "state dict"
        state = unwrap_state_dict(checkpoint, source)
    target = model.state_dict()

    if _is_image_state(state) and not _is_image_state(target):
        if inflate is None:
            raise CheckpointError(
                f"{source}: holds an image model (2-D stem) but the model is a video model; "
                f"inflate it: load_checkpoint(..., inflate='center' or 'mean')"
            )
        state = inflate_image_checkpoint(state, model, mode=inflate)

    report = LoadReport(source=source)
    ckpt_head, model_head = state.get("head.weight"), target.get("head.weight")
    if _shape(ckpt_head) != _shape(model_head):
        # Another class count (or a backbone-only file): the model keeps its new classifier.
        state = {k: v for k, v in state.items() if k not in _HEAD_KEYS}
        target = {k: v for k, v in target.items() if k not in _HEAD_KEYS}
        report.head_reset = True
        log.info(
            "%s: classifier shape %s, the model's %s: keeping the model's new head",
            source,
            _shape(ckpt_head),
            _shape(model_head),
        )

    # Batch norm fills in a missing step counter itself (files from older torch lack it).
    report.missing = [k for k in target if k not in state and not k.endswith("num_batches_tracked")]
    report.unexpected = [k for k in state if k not in target]
    report.mis_shaped = [
        f"{k} (checkpoint {list(state[k].shape)}, model {list(target[k].shape)})"
        for k in state
        if k in target and state[k].shape != target[k].shape
    ]
    if strict and (report.missing or report.unexpected or report.mis_shaped):
        problems = [
            f"{len(keys)} {what}: {_listing(keys)}"
            for what, keys in (
                ("missing keys", report.missing),
                ("unexpected keys", report.unexpected),
                ("mis-shaped keys", report.mis_shaped),
            )
            if keys
        ]
        raise CheckpointError(
            f"{source} does not fit the model{_describe(model)}: {'; '.join(problems)}"
        )
    fitting = {k: v for k, v in state.items() if k in target and v.shape == target[k].shape}
    model.load_state_dict(fitting, strict=False)
    if report.missing or report.unexpected or report.mis_shaped:
        log.warning(
            "%s: loaded non-strictly: %d missing, %d unexpected, %d mis-shaped keys",
            source,
            len(report.missing),
            len(report.unexpected),
            len(report.mis_shaped),
        )
    return report


def inflate_image_checkpoint(
    state: Mapping[str, Tensor], model: nn.Module, mode: Inflation = "center"
) -> dict[str, Tensor]:
    """Turn an image model's weights (2-D convs, no temporal branch) into `model`'s (video).

    2-D kernels gain the model's temporal extent: "center" puts the kernel at the middle time
    step (zeros elsewhere), so a static video gives exactly the image model's features;
    "mean" repeats it divided by the extent (I3D), the same on static input up to zero padding
    at the clip's ends. The temporal branch (t_norm1, t_fc) comes from `model` as initialised,
    which makes it start as an identity.
    """
    if mode not in ("center", "mean"):
        raise ConfigError(f"inflation mode {mode!r} is not allowed; choose 'center' or 'mean'")
    target = model.state_dict()
    out = dict(state)
    for key, value in state.items():
        goal = target.get(key)
        if goal is None or not (value.ndim == 4 and goal.ndim == 5):
            continue
        extent = goal.shape[2]
        if mode == "mean":
            out[key] = value.unsqueeze(2).repeat(1, 1, extent, 1, 1) / extent
        else:
            inflated = value.new_zeros(*value.shape[:2], extent, *value.shape[2:])
            inflated[:, :, extent // 2] = value
            out[key] = inflated
    for key, value in target.items():
        if key not in out and (".t_fc." in key or ".t_norm1." in key):
            out[key] = value.clone()
    return out


def _shape(tensor: Tensor | None) -> list[int] | None:
    return None if tensor is None else list(tensor.shape)


def _is_image_state(state: Mapping[str, Tensor]) -> bool:
    stem = state.get("patch_embed1.proj1.weight")
    return stem is not None and stem.ndim == 4


def _describe(model: nn.Module) -> str:
    cfg = getattr(model, "cfg", None)
    if cfg is None:
        return ""
    return (
        f" (depths {list(cfg.depths)}, widths {list(cfg.widths)}, num_frames {cfg.num_frames}, "
        f"img_size {cfg.img_size}, num_classes {cfg.num_classes})"
    )


def _listing(keys: list[str]) -> str:
    shown = ", ".join(keys[:_MAX_LISTED])
    return shown if len(keys) <= _MAX_LISTED else f"{shown}, ... ({len(keys) - _MAX_LISTED} more)"
