"""`create_model`: a named variant, adjusted, optionally with weights, in one call (timm style)."""

from __future__ import annotations

from morphmlp.models.morphmlp import MorphMLP, build_model
from morphmlp.models.variants import variant_config
from morphmlp.models.weights import load_checkpoint


def create_model(
    name: str,
    *,
    num_classes: int | None = None,
    num_frames: int | None = None,
    img_size: int | None = None,
    drop_path_rate: float | None = None,
    checkpoint: str | None = None,
    **overrides,
) -> MorphMLP:
    """Build variant `name` ("morphmlp_s", or "s"; see `list_models()`).

    Arguments left as None keep the variant's value (400 classes for video variants, 1000 for
    image ones). `overrides` set any other `MorphMLPConfig` field. `checkpoint` (a path or URI)
    is loaded strictly; a classifier of another size is left freshly initialised.
    """
    given = {
        "num_classes": num_classes,
        "num_frames": num_frames,
        "img_size": img_size,
        "drop_path_rate": drop_path_rate,
    }
    cfg = variant_config(name, **{k: v for k, v in given.items() if v is not None}, **overrides)
    model = build_model(cfg)
    if checkpoint is not None:
        load_checkpoint(model, checkpoint, strict=True)
    return model
