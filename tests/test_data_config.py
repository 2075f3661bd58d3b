"""DataConfig: the release's defaults, and invalid values rejected at construction by name."""

import pytest

from morphmlp.config import from_dict, to_dict
from morphmlp.data.config import DataConfig
from morphmlp.errors import ConfigError


def test_defaults_are_the_release_k400_recipe():
    cfg = DataConfig()
    assert (cfg.num_frames, cfg.sampling_rate, cfg.target_fps) == (16, 4, 30.0)
    assert cfg.decode_short_side == 256  # TRAIN_JITTER_SCALES[0], the release's max_spatial_scale
    assert cfg.test_short_side(1) == 256 and cfg.test_short_side(3) == 224
    assert cfg.rand_augment == "rand-m7-n4-mstd0.5-inc1" and cfg.random_erasing == 0.25


def test_from_yaml_mapping_round_trips():
    tree = {
        "sampling": "segment",
        "random_flip": True,
        "flip_label_map": {86: 87, 87: 86},
        "train_jitter_scales": [128, 160],
        "train_crop_size": 112,
        "test_crop_size": 112,
    }
    cfg = from_dict(DataConfig, tree)
    assert cfg.train_jitter_scales == (128, 160) and cfg.flip_label_map == {86: 87, 87: 86}
    assert from_dict(DataConfig, to_dict(cfg)) == cfg


@pytest.mark.parametrize(
    ("field", "value", "message"),
    [
        ("num_frames", 0, "data.num_frames"),
        ("sampling", "sparse", "data.sampling"),
        ("train_crop", "center", "data.train_crop"),
        ("target_fps", 0.0, "data.target_fps"),
        ("train_jitter_scales", (320, 256), "data.train_jitter_scales"),
        ("rrc_scale", (0.5, 1.5), "data.rrc_scale"),
        ("rrc_ratio", (2.0, 1.0), "data.rrc_ratio"),
        ("flip_label_map", {0: -1}, "data.flip_label_map"),
        ("rand_augment", "rand-m7-x4", "data.rand_augment"),
        ("random_erasing", 1.5, "data.random_erasing"),
        ("std", (0.2, 0.0, 0.2), "data.std"),
        ("test_num_crops", 2, "data.test_num_crops"),
        ("test_scale", 100, "data.test_scale"),
        ("decode_actors", (3, 2), "data.decode_actors"),
        ("cpus_per_decode_actor", 0.0, "data.cpus_per_decode_actor"),
        ("decode_resource", "CPU", "data.decode_resource='CPU' must be .*custom Ray resource"),
        ("decode_resource", "", "data.decode_resource"),
        ("max_bad_fraction", 2.0, "data.max_bad_fraction"),
    ],
)
def test_invalid_values_fail_at_construction_naming_the_field(field, value, message):
    with pytest.raises(ConfigError, match=message):
        DataConfig(**{field: value})


def test_jitter_crop_needs_a_short_side_at_least_the_crop():
    with pytest.raises(ConfigError, match=r"train_jitter_scales: min 200 .*train_crop_size 224"):
        DataConfig(train_crop="jitter", train_jitter_scales=(200, 320))


def test_unknown_key_names_the_allowed_ones():
    with pytest.raises(ConfigError, match=r"unknown config key 'frames'.*num_frames"):
        from_dict(DataConfig, {"frames": 8})
