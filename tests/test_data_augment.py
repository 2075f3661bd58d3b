"""Per-clip augmentation: one crop / flip / RandAugment draw for every frame, the flip label map,
determinism by seed, and PySlowFast's test crops."""

import subprocess
import sys

import numpy as np
import pytest
from PIL import Image

from morphmlp.data.augment import (
    _INCREASING_OPS,
    _OPS,
    RandAugment,
    _random_resized_box,
    train_augment,
    uniform_crops,
)
from morphmlp.data.config import DataConfig


def _textured_clip(frames=6, height=72, width=96, seed=0):
    """Identical frames of a random texture: any per-frame difference after augmentation would
    mean the frames got different random parameters."""
    # Grey levels 40..200: room for every RandAugment op (autocontrast included) to act.
    image = np.random.default_rng(seed).integers(40, 200, (height, width, 3), dtype=np.uint8)
    return np.repeat(image[None], frames, axis=0)


@pytest.mark.parametrize("crop", ["random_resized", "jitter"])
def test_one_crop_flip_and_randaugment_for_all_frames(crop):
    cfg = DataConfig(
        train_crop=crop, train_crop_size=48, test_crop_size=48, train_jitter_scales=(72, 90)
    )
    clip = _textured_clip()
    outputs = []
    for seed in range(8):
        out, _ = train_augment(clip, 0, cfg, np.random.default_rng(seed))
        assert out.shape == (6, 48, 48, 3) and out.dtype == np.uint8
        assert all(np.array_equal(out[0], frame) for frame in out[1:])
        outputs.append(out)
    assert len({out.tobytes() for out in outputs}) == len(outputs)  # and it does vary by seed


def test_random_resized_crop_draws_boxes_in_range():
    rng = np.random.default_rng(0)
    scale, ratio = (0.08, 1.0), (3 / 4, 4 / 3)
    areas = []
    for _ in range(500):
        left, top, right, bottom = _random_resized_box(100, 100, scale, ratio, rng)
        assert 0 <= left < right <= 100 and 0 <= top < bottom <= 100
        areas.append((right - left) * (bottom - top) / (100 * 100))
    assert min(areas) < 0.15 and max(areas) > 0.8  # the scale range is covered
    # No box of this shape fits a 10x1000 strip: the fallback is the central crop, ratio clamped.
    assert _random_resized_box(10, 1000, (0.9, 1.0), ratio, rng) == (493, 0, 506, 10)


def test_jitter_crops_a_rescaled_frame():
    # A horizontal ramp: after a jitter crop, columns must still increase left to right, and the
    # crop covers crop / short_side of the frame's height (short side rescaled into 72..90).
    ramp = np.repeat(np.linspace(0, 255, 96).astype(np.uint8)[None, None, :, None], 72, axis=1)
    clip = np.repeat(np.repeat(ramp, 3, axis=3), 2, axis=0)  # (2, 72, 96, 3)
    cfg = DataConfig(
        train_crop="jitter",
        train_crop_size=48,
        test_crop_size=48,
        train_jitter_scales=(72, 90),
        random_flip=False,
        rand_augment=None,
    )
    out, _ = train_augment(clip, 0, cfg, np.random.default_rng(3))
    row = out[0, 24, :, 0].astype(int)
    assert np.all(np.diff(row) >= 0) and row[-1] - row[0] > 80


def test_same_seed_same_clip_different_seed_different_clip():
    cfg = DataConfig(train_crop_size=48)
    clip = _textured_clip()
    first, _ = train_augment(clip, 0, cfg, np.random.default_rng([1, 2, 3]))
    again, _ = train_augment(clip, 0, cfg, np.random.default_rng([1, 2, 3]))
    other, _ = train_augment(clip, 0, cfg, np.random.default_rng([1, 2, 4]))
    assert np.array_equal(first, again) and not np.array_equal(first, other)


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
        flipped = not np.array_equal(out, unflipped)
        assert label == (1 if flipped else 0)
        if flipped:
            assert np.array_equal(out, unflipped[:, :, ::-1])
        labels[label] = labels.get(label, 0) + 1
        # a label outside the map keeps its value
        assert train_augment(clip, 5, flipping, np.random.default_rng(seed))[1] == 5
    assert set(labels) == {0, 1}  # both happen across seeds


def test_rand_augment_parses_the_timm_string_and_every_op_runs():
    ra = RandAugment("rand-m7-n4-mstd0.5-inc1")
    assert (ra.magnitude, ra.num_ops, ra.magnitude_std, ra.ops) == (7.0, 4, 0.5, _INCREASING_OPS)
    assert RandAugment("rand-m9-n2").ops is _OPS
    frames = [Image.fromarray(frame) for frame in _textured_clip(frames=3)]
    rng = np.random.default_rng(0)
    for op in _OPS + _INCREASING_OPS:
        out = [np.asarray(frame) for frame in op(frames, 0.7, rng)]
        assert len(out) == 3 and out[0].shape == (72, 96, 3) and out[0].dtype == np.uint8
        assert all(np.array_equal(out[0], frame) for frame in out[1:])
    original = np.asarray(frames[0])
    changed = sum(
        not np.array_equal(np.asarray(op(frames, 0.7, rng)[0]), original) for op in _INCREASING_OPS
    )
    assert changed == len(_INCREASING_OPS)  # at magnitude 7 every op alters a random texture


def test_solarize_add_brightens_only_dark_pixels():
    solarize_add = _OPS[6]
    frame = Image.fromarray(np.array([[[10, 127, 128]], [[200, 250, 0]]], dtype=np.uint8))
    out = np.asarray(solarize_add([frame], 1.0, np.random.default_rng(0))[0])
    # level 1: +110 below 128, clipped at 255; 128 and above unchanged.
    assert out.tolist() == [[[120, 237, 128]], [[200, 250, 110]]]


def test_uniform_crops_follow_uniform_crop():
    # Landscape 40x70, crop 40: offsets x = 0, ceil(30 / 2) = 15, 30.
    clip = np.broadcast_to(np.arange(70, dtype=np.uint8)[None, None, :, None], (2, 40, 70, 3))
    left, center, right = uniform_crops(clip, 40, 3)
    assert [int(c[0, 0, 0, 0]) for c in (left, center, right)] == [0, 15, 30]
    assert int(uniform_crops(clip, 40, 1)[0][0, 0, 0, 0]) == 15
    # Portrait 70x40: top, center, bottom.
    tall = np.broadcast_to(np.arange(70, dtype=np.uint8)[None, :, None, None], (2, 70, 40, 3))
    assert [int(c[0, 0, 0, 0]) for c in uniform_crops(tall, 40, 3)] == [0, 15, 30]


def test_the_decode_path_does_not_import_torch():
    """The decode actors import these modules; torch (a CUDA build) would add ~500 MiB to each."""
    code = (
        "import sys, morphmlp.data.pipeline, morphmlp.data.augment, morphmlp.data.sampling;"
        "print(sorted(m for m in ('torch', 'torchvision') if m in sys.modules))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"
