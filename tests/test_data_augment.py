"""Per-clip augmentation: one crop / flip / RandAugment draw for every frame, the flip label map,
determinism by seed, and PySlowFast's test crops."""

import numpy as np
import pytest
import torch

from morphmlp.data.augment import _INCREASING_OPS, _OPS, RandAugment, train_augment, uniform_crops
from morphmlp.data.config import DataConfig


def _textured_clip(frames=6, height=72, width=96, seed=0):
    """Identical frames of a random texture: any per-frame difference after augmentation would
    mean the frames got different random parameters."""
    # Grey levels 40..200: room for every RandAugment op (autocontrast included) to act.
    image = torch.from_numpy(np.random.default_rng(seed).integers(40, 200, (3, height, width)))
    return image.to(torch.uint8).unsqueeze(0).repeat(frames, 1, 1, 1)


@pytest.mark.parametrize("crop", ["random_resized", "jitter"])
def test_one_crop_flip_and_randaugment_for_all_frames(crop):
    cfg = DataConfig(
        train_crop=crop, train_crop_size=48, test_crop_size=48, train_jitter_scales=(72, 90)
    )
    clip = _textured_clip()
    for seed in range(8):
        out, _ = train_augment(clip, 0, cfg, np.random.default_rng(seed))
        assert out.shape == (6, 3, 48, 48) and out.dtype == torch.uint8
        assert all(torch.equal(out[0], frame) for frame in out[1:])


def test_same_seed_same_clip_different_seed_different_clip():
    cfg = DataConfig(train_crop_size=48)
    clip = _textured_clip()
    first, _ = train_augment(clip, 0, cfg, np.random.default_rng([1, 2, 3]))
    again, _ = train_augment(clip, 0, cfg, np.random.default_rng([1, 2, 3]))
    other, _ = train_augment(clip, 0, cfg, np.random.default_rng([1, 2, 4]))
    assert torch.equal(first, again) and not torch.equal(first, other)
    # Torch's global RNG is left alone (augmentation runs in a fork of it).
    torch.manual_seed(5)
    expected = torch.rand(3)
    torch.manual_seed(5)
    train_augment(clip, 0, cfg, np.random.default_rng(0))
    assert torch.equal(torch.rand(3), expected)


def test_flip_mirrors_the_crop_and_swaps_mapped_labels():
    plain = DataConfig(train_crop_size=48, rand_augment=None, random_flip=False)
    flipping = DataConfig(
        train_crop_size=48, rand_augment=None, random_flip=True, flip_label_map={0: 1, 1: 0}
    )
    clip = _textured_clip()
    labels = {}
    for seed in range(12):
        unflipped, label = train_augment(clip, 0, plain, np.random.default_rng(seed))
        out, label = train_augment(clip, 0, flipping, np.random.default_rng(seed))
        flipped = not torch.equal(out, unflipped)
        assert label == (1 if flipped else 0)
        if flipped:
            assert torch.equal(out, unflipped.flip(-1))
        labels[label] = labels.get(label, 0) + 1
        # a label outside the map keeps its value
        assert train_augment(clip, 5, flipping, np.random.default_rng(seed))[1] == 5
    assert set(labels) == {0, 1}  # both happen across seeds


def test_rand_augment_parses_the_timm_string_and_every_op_runs():
    ra = RandAugment("rand-m7-n4-mstd0.5-inc1")
    assert (ra.magnitude, ra.num_ops, ra.magnitude_std, ra.ops) == (7.0, 4, 0.5, _INCREASING_OPS)
    assert RandAugment("rand-m9-n2").ops is _OPS
    clip = _textured_clip(frames=3)
    rng = np.random.default_rng(0)
    for op in _OPS + _INCREASING_OPS:
        out = op(clip, 0.7, rng)
        assert out.shape == clip.shape and out.dtype == torch.uint8
        assert all(torch.equal(out[0], frame) for frame in out[1:])
    changed = sum(not torch.equal(op(clip, 0.7, rng), clip) for op in _INCREASING_OPS)
    assert changed == len(_INCREASING_OPS)  # at magnitude 7 every op alters a random texture


def test_uniform_crops_follow_uniform_crop():
    # Landscape 40x70, crop 40: offsets x = 0, ceil(30 / 2) = 15, 30.
    clip = torch.arange(70).repeat(2, 3, 40, 1).to(torch.uint8)  # pixel value = its x
    left, center, right = uniform_crops(clip, 40, 3)
    assert [int(c[0, 0, 0, 0]) for c in (left, center, right)] == [0, 15, 30]
    assert int(uniform_crops(clip, 40, 1)[0][0, 0, 0, 0]) == 15
    # Portrait 70x40: top, center, bottom.
    tall = torch.arange(70).view(70, 1).repeat(2, 3, 1, 40).to(torch.uint8)
    assert [int(c[0, 0, 0, 0]) for c in uniform_crops(tall, 40, 3)] == [0, 15, 30]
