"""Clip frame indices against values worked out by hand from PySlowFast's formulas
(slowfast/datasets/decoder.py get_start_end_idx + temporal_sampling with USE_OFFSET_SAMPLING,
slowfast/datasets/sth.py get_seq_frames)."""

import numpy as np
import torch

from morphmlp.data.config import DataConfig
from morphmlp.data.sampling import (
    clip_indices,
    dense_indices,
    get_start_end_idx,
    linspace_float32,
    segment_indices,
)

# 5 frames at stride 4 (30 fps): clip_size = 4 * 5 = 20 frames, so the frames sit at
# start + 19 * k / 4 = start + (0, 4.75, 9.5, 14.25, 19) -- exact in binary floating point.
DENSE = dict(num_frames=5, sampling_rate=4, target_fps=30.0)


def test_dense_test_clip_is_centred_for_one_view():
    # 100 frames: delta = 100 - 20 = 80, start = floor(80 / 2) = 40.
    got = dense_indices(100, 30.0, clip_idx=0, num_clips=1, **DENSE)
    assert got.tolist() == [40, 44, 49, 54, 59]


def test_dense_test_clips_use_offset_sampling():
    # start_k = k * floor(80 / (3 - 1)) = 0, 40, 80.
    got = [dense_indices(100, 30.0, clip_idx=k, num_clips=3, **DENSE).tolist() for k in range(3)]
    assert got == [[0, 4, 9, 14, 19], [40, 44, 49, 54, 59], [80, 84, 89, 94, 99]]
    # 4 views of 101 frames: floor(81 / 3) = 27 -> starts 0, 27, 54, 81.
    starts = [get_start_end_idx(101, 20, k, 4)[0] for k in range(4)]
    assert starts == [0, 27, 54, 81]


def test_dense_resamples_other_frame_rates_to_target_fps():
    # 60 fps: the clip spans 4 * 5 / 30 * 60 = 40 frames -> start + 39 * k / 4 = (0, 9.75, ...).
    # 100 frames: delta 60, start 30 -> 30, 39.75, 49.5, 59.25, 69.
    got = dense_indices(100, 60.0, clip_idx=0, num_clips=1, **DENSE)
    assert got.tolist() == [30, 39, 49, 59, 69]


def test_dense_short_video_repeats_its_last_frame():
    # 10 frames < 20: delta 0, start 0, indices 0, 4.75, 9.5, 14.25, 19 clamped to 9.
    got = dense_indices(10, 30.0, clip_idx=0, num_clips=1, **DENSE)
    assert got.tolist() == [0, 4, 9, 9, 9]


def test_dense_training_start_is_uniform_in_delta():
    rng = np.random.default_rng(7)
    got = dense_indices(100, 30.0, clip_idx=-1, num_clips=1, rng=rng, **DENSE)
    start = np.random.default_rng(7).uniform(0, 80)  # the same draw, made here
    assert got.tolist() == [int(start + d) for d in (0, 4.75, 9.5, 14.25, 19)]
    starts = [
        dense_indices(100, 30.0, clip_idx=-1, num_clips=1, rng=rng, **DENSE)[0] for _ in range(300)
    ]
    assert min(starts) >= 0 and max(starts) <= 80 and len(set(starts)) > 40


def test_segment_test_takes_each_segment_middle():
    # 50 frames, 8 segments: seg = 49 / 8 = 6.125; bounds round(6.125 i) with numpy's
    # half-to-even: 0 6 12 18 24 31 37 43 49 (24.5 -> 24). One view: offset int(6.125 / 2) = 3.
    got = segment_indices(50, num_frames=8, clip_idx=0, num_clips=1)
    assert got.tolist() == [3, 9, 15, 21, 27, 34, 40, 46]
    # Two views: offset int(6.125 / 3 * (k + 1)) = 2, 4.
    assert segment_indices(50, num_frames=8, clip_idx=0, num_clips=2).tolist() == [
        2,
        8,
        14,
        20,
        26,
        33,
        39,
        45,
    ]
    assert segment_indices(50, num_frames=8, clip_idx=1, num_clips=2).tolist() == [
        4,
        10,
        16,
        22,
        28,
        35,
        41,
        47,
    ]


def test_segment_training_draws_one_frame_per_segment():
    bounds = [(0, 6), (6, 12), (12, 18), (18, 24), (24, 31), (31, 37), (37, 43), (43, 49)]
    got = segment_indices(50, num_frames=8, clip_idx=-1, num_clips=1, rng=np.random.default_rng(3))
    mirror = np.random.default_rng(3)
    assert got.tolist() == [int(mirror.integers(lo, hi + 1)) for lo, hi in bounds]
    rng = np.random.default_rng(0)
    draws = np.stack(
        [segment_indices(50, num_frames=8, clip_idx=-1, num_clips=1, rng=rng) for _ in range(400)]
    )
    for i, (lo, hi) in enumerate(bounds):  # every frame of the segment, ends included
        assert set(draws[:, i].tolist()) == set(range(lo, hi + 1))


def test_clip_indices_dispatches_on_the_config():
    dense = DataConfig(num_frames=5, sampling_rate=4)
    assert clip_indices(dense, 100, 30.0, clip_idx=0, num_clips=1).tolist() == [40, 44, 49, 54, 59]
    segment = DataConfig(num_frames=8, sampling="segment")
    assert clip_indices(segment, 50, 12.0, clip_idx=0, num_clips=1).tolist() == [
        3,
        9,
        15,
        21,
        27,
        34,
        40,
        46,
    ]


def test_linspace_float32_is_torch_linspace_bit_for_bit():
    """PySlowFast truncates torch.linspace's float32 values; the numpy replica must give the same
    floats (not just close ones), or a value a rounding below an integer picks another frame."""
    rng = np.random.default_rng(0)
    for trial in range(20_000):
        # Integer ends (as get_start_end_idx gives at test time) and fractional ones (training).
        start = float(rng.integers(0, 3000)) if trial % 3 == 0 else float(rng.uniform(0, 3000))
        end = start + (float(rng.integers(0, 3000)) if trial % 5 == 0 else rng.uniform(0, 3000))
        steps = int(rng.integers(1, 130))
        expected = torch.linspace(start, end, steps).numpy()
        np.testing.assert_array_equal(linspace_float32(start, end, steps), expected)
