"""Which frames of a video make a clip: PySlowFast's formulas, so accuracy is comparable.

Dense (Kinetics, slowfast/datasets/decoder.py): a clip spans sampling_rate * num_frames frames at
target_fps, i.e. `clip_size` frames at the video's own rate; training starts it uniformly at random,
testing takes num_clips evenly spaced starts with the release's offset sampling
(USE_OFFSET_SAMPLING: the center clip for one view, clip k at k * floor(delta / (num_clips - 1))).
num_frames indices are spread evenly over the clip and clamped to the video, so a video shorter
than the clip repeats frames.

Segment (Something-Something, slowfast/datasets/sth.py): the video is cut into num_frames equal
segments; training takes a random frame of each, testing the frame at (k + 1) / (num_clips + 1) of
each segment (the middle for one view).

`clip_idx == -1` means training (random); rng is a numpy Generator seeded per sample.
"""

from __future__ import annotations

import math

import numpy as np

from morphmlp.data.config import DataConfig


def get_start_end_idx(
    video_size: float,
    clip_size: float,
    clip_idx: int,
    num_clips: int,
    rng: np.random.Generator | None = None,
) -> tuple[float, float]:
    """First and last (fractional) frame index of a clip; PySlowFast with use_offset=True."""
    delta = max(video_size - clip_size, 0)
    if clip_idx == -1:
        assert rng is not None, "training sampling needs an rng"
        start = rng.uniform(0, delta)
    elif num_clips == 1:
        start = math.floor(delta / 2)
    else:
        start = clip_idx * math.floor(delta / (num_clips - 1))
    return start, start + clip_size - 1


def dense_indices(
    num_video_frames: int,
    fps: float,
    *,
    num_frames: int,
    sampling_rate: int,
    target_fps: float,
    clip_idx: int,
    num_clips: int,
    rng: np.random.Generator | None = None,
) -> np.ndarray:
    clip_size = sampling_rate * num_frames / target_fps * fps
    start, end = get_start_end_idx(num_video_frames, clip_size, clip_idx, num_clips, rng)
    # torch.linspace in float32 then truncation, exactly as decoder.temporal_sampling does.
    index = np.clip(linspace_float32(start, end, num_frames), 0, num_video_frames - 1)
    return index.astype(np.int64)


def linspace_float32(start: float, end: float, steps: int) -> np.ndarray:
    """torch.linspace(start, end, steps) (float32) in numpy: the decode actors don't load torch.

    Same arithmetic as torch's CPU kernel: a float32 step, the first half counted up from start
    and the second half down from end (so both ends are exact), each value a fused multiply-add
    (one rounding; float64 holds the product and sum exactly for frame-index magnitudes).
    """
    first, last = np.float32(start), np.float32(end)
    if steps == 1:
        return np.array([first], dtype=np.float32)
    step = np.float64((last - first) / np.float32(steps - 1))
    idx = np.arange(steps, dtype=np.float64)
    halfway = steps // 2
    up = np.float64(first) + step * idx[:halfway]
    down = np.float64(last) - step * (steps - 1 - idx[halfway:])
    return np.concatenate([up, down]).astype(np.float32)


def segment_indices(
    num_video_frames: int,
    *,
    num_frames: int,
    clip_idx: int,
    num_clips: int,
    rng: np.random.Generator | None = None,
) -> np.ndarray:
    seg_size = float(num_video_frames - 1) / num_frames
    bounds = [
        (int(np.round(seg_size * i)), int(np.round(seg_size * (i + 1)))) for i in range(num_frames)
    ]
    if clip_idx == -1:
        assert rng is not None, "training sampling needs an rng"
        return np.array([rng.integers(lo, hi + 1) for lo, hi in bounds], dtype=np.int64)
    offset = int(seg_size / (num_clips + 1) * (clip_idx + 1))
    return np.array([lo + offset for lo, _ in bounds], dtype=np.int64)


def clip_indices(
    cfg: DataConfig,
    num_video_frames: int,
    fps: float,
    *,
    clip_idx: int,
    num_clips: int,
    rng: np.random.Generator | None = None,
) -> np.ndarray:
    """Frame indices (0-based, within the video or its [start, end] window) of one clip."""
    if cfg.sampling == "dense":
        return dense_indices(
            num_video_frames,
            fps,
            num_frames=cfg.num_frames,
            sampling_rate=cfg.sampling_rate,
            target_fps=cfg.target_fps,
            clip_idx=clip_idx,
            num_clips=num_clips,
            rng=rng,
        )
    return segment_indices(
        num_video_frames, num_frames=cfg.num_frames, clip_idx=clip_idx, num_clips=num_clips, rng=rng
    )
