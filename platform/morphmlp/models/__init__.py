"""The MorphMLP network, its named variants, checkpoint I/O and cost counting."""

from morphmlp.models.factory import create_model
from morphmlp.models.flops import count_gmacs, count_params
from morphmlp.models.morphmlp import MorphMLP, build_model
from morphmlp.models.variants import (
    VARIANTS,
    MorphMLPConfig,
    default_temporal_groups,
    list_models,
    load_variant_file,
    save_variant_file,
    stage_grids,
    valid_chunk_lengths,
    valid_temporal_groups,
    variant_config,
    variant_name,
)
from morphmlp.models.weights import CheckpointError, inflate_image_checkpoint, load_checkpoint

__all__ = [
    "VARIANTS",
    "CheckpointError",
    "MorphMLP",
    "MorphMLPConfig",
    "build_model",
    "count_gmacs",
    "count_params",
    "create_model",
    "default_temporal_groups",
    "inflate_image_checkpoint",
    "list_models",
    "load_checkpoint",
    "load_variant_file",
    "save_variant_file",
    "stage_grids",
    "valid_chunk_lengths",
    "valid_temporal_groups",
    "variant_config",
    "variant_name",
]
