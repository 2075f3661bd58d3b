"""`create_model`: the one door to a MorphMLP network (timm style), for training, search and
evaluation alike.

A model is named by a registered variant ("s", "morphmlp_s"; see `list_models()`), by a variant
YAML (any URI: the search writes one per trial and its best as best.yaml), or given as a
`MorphMLPConfig`. `model_config` resolves any of these, with fields overridden, without building
anything (the search costs architectures with it); `create_model` builds the network and loads
weights. `build_model(MorphMLPConfig)` stays the low-level constructor.
"""

from __future__ import annotations

from typing import Any

from morphmlp.config import from_dict, to_dict
from morphmlp.errors import ConfigError
from morphmlp.models.morphmlp import MorphMLP, build_model
from morphmlp.models.variants import MorphMLPConfig, load_variant_file, variant_config
from morphmlp.models.weights import load_checkpoint

VARIANT_FILE_SUFFIXES = (".yaml", ".yml")


def model_config(variant: str | MorphMLPConfig, **overrides: Any) -> MorphMLPConfig:
    """The architecture of a variant name, a variant YAML or a config, with fields overridden
    (checked like any config source: an unknown field or a wrong type names itself)."""
    if isinstance(variant, MorphMLPConfig):
        if not overrides:
            return variant
        return from_dict(MorphMLPConfig, {**to_dict(variant), **overrides})
    if variant.endswith(VARIANT_FILE_SUFFIXES):
        base = load_variant_file(variant)
        if not overrides:
            return base
        try:
            return from_dict(MorphMLPConfig, {**to_dict(base), **overrides})
        except ConfigError as err:
            raise ConfigError(f"{variant}: {err}") from err
    return variant_config(variant, **overrides)


def create_model(
    name: str | MorphMLPConfig,
    *,
    num_classes: int | None = None,
    num_frames: int | None = None,
    img_size: int | None = None,
    drop_path_rate: float | None = None,
    grad_checkpointing: bool = False,
    pretrained: str | None = None,
    checkpoint: str | None = None,
    **overrides: Any,
) -> MorphMLP:
    """Build `name` (a variant name, a variant YAML path/URI, or a `MorphMLPConfig`).

    Arguments left as None keep the variant's value (400 classes for video variants, 1000 for
    image ones). `overrides` set any other `MorphMLPConfig` field.
    `pretrained` (path or URI) initialises training: an image checkpoint is inflated (its
    kernels at the middle frame, "center"), a video one loads as it is.
    `checkpoint` (path or URI) is loaded strictly, as it is.
    Either way a classifier of another size is left freshly initialised.
    """
    given = {
        "num_classes": num_classes,
        "num_frames": num_frames,
        "img_size": img_size,
        "drop_path_rate": drop_path_rate,
    }
    cfg = model_config(name, **{k: v for k, v in given.items() if v is not None}, **overrides)
    model = build_model(cfg)
    if pretrained is not None:
        load_checkpoint(model, pretrained, strict=True, inflate="center")
    if checkpoint is not None:
        load_checkpoint(model, checkpoint, strict=True)
    if grad_checkpointing:
        model.set_grad_checkpointing(True)
    return model
