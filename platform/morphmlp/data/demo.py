"""The built-in demo dataset: synthetic videos whose classes need temporal modelling.

Six classes: a shape moving left / right / up / down, growing / shrinking. Any single frame is
consistent with every class (random shapes, colours, positions, angles, sizes over still, muted
backgrounds), so only motion tells them apart. (Demo v4 had clockwise / counter-clockwise
rotation in place of up / down: xs did not learn the sense of rotation within the demo's budget of
10 minutes on 2 CPU cores; docs/benchmarks.md has what was tried.) Videos are real
H.264 mp4 encoded with PyAV at varied sizes (short side 112-160), frame rates (12-30 fps) and
lengths (1.5-2.5 s), generated once into a cache folder (atomically: built in a temporary folder and
renamed), deterministic by seed, with a Parquet index whose video URIs are relative to it.

A horizontal flip turns left into right: train with
data.flip_label_map = DEMO_FLIP_LABEL_MAP (or random_flip off), as the demo recipe
(morphmlp/train/recipes/xs.yaml) does.
"""

from __future__ import annotations

import colorsys
import logging
import math
import os
import shutil
import tempfile
import time

import av
import numpy as np
import pyarrow as pa
from PIL import Image, ImageDraw

from morphmlp.data.decode import probe_video
from morphmlp.data.index import VideoIndex, write_index

log = logging.getLogger(__name__)

# Part of the cache folder's name: bump it whenever the generated videos change, or a cached
# older dataset is read with the new class names.
DEMO_VERSION = "v5"
CLASS_NAMES = ["move_left", "move_right", "move_up", "move_down", "grow", "shrink"]
DEMO_FLIP_LABEL_MAP = {0: 1, 1: 0}
_SHORT_SIDES = (112, 120, 128, 144, 160)
_ASPECTS = (4 / 3, 16 / 9, 1.0)  # landscape: room for sideways travel
_FRAME_RATES = (12, 15, 20, 24, 25, 30)


def ensure_demo_dataset(
    cache_dir: str | None = None,
    seed: int = 0,
    *,
    train_per_class: int = 80,
    val_per_class: int = 20,
) -> str:
    """Path of the demo index (Parquet), generating the videos on first use.

    cache_dir defaults to $MORPHMLP_CACHE or ~/.cache/morphmlp; the dataset lives in
    <cache_dir>/demo-<version>-seed<seed> (plus -<train>x<val> for non-default sizes).
    """
    base = cache_dir or os.environ.get("MORPHMLP_CACHE") or os.path.expanduser("~/.cache/morphmlp")
    name = f"demo-{DEMO_VERSION}-seed{seed}"
    if (train_per_class, val_per_class) != (80, 20):
        name += f"-{train_per_class}x{val_per_class}"
    folder = os.path.join(base, name)
    index_path = os.path.join(folder, "index.parquet")
    if os.path.exists(index_path):
        return index_path
    os.makedirs(base, exist_ok=True)
    started = time.monotonic()
    tmp = tempfile.mkdtemp(prefix=f".{name}.tmp-", dir=base)
    try:
        _generate(tmp, seed, {"train": train_per_class, "val": val_per_class})
        try:
            os.rename(tmp, folder)
        except OSError:
            if not os.path.exists(index_path):  # not a concurrent builder winning the race
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    log.info("generated the demo dataset in %s (%.1fs)", folder, time.monotonic() - started)
    return index_path


def _generate(folder: str, seed: int, per_class: dict[str, int]) -> None:
    rows = []
    for split_number, (split, count) in enumerate(per_class.items()):
        for label, class_name in enumerate(CLASS_NAMES):
            for i in range(count):
                rng = np.random.default_rng([seed, split_number, label, i])
                relative = f"videos/{split}/{class_name}/{i:04d}.mp4"
                path = os.path.join(folder, relative)
                os.makedirs(os.path.dirname(path), exist_ok=True)
                _write_video(path, label, rng)
                info = probe_video(path)
                rows.append(
                    {
                        "uri": path,
                        "label": label,
                        "split": split,
                        "duration_sec": info.duration_sec,
                        "fps": info.fps,
                        "num_frames": info.num_frames,
                        "width": info.width,
                        "height": info.height,
                        "codec": info.codec,
                    }
                )
    index_path = os.path.join(folder, "index.parquet")
    write_index(VideoIndex(pa.Table.from_pylist(rows), list(CLASS_NAMES)), None, index_path)


def _write_video(path: str, label: int, rng: np.random.Generator) -> None:
    short = int(rng.choice(_SHORT_SIDES))
    aspect = float(rng.choice(_ASPECTS))
    width, height = (
        (round(short * aspect), short) if aspect >= 1 else (short, round(short / aspect))
    )
    width, height = width - width % 2, height - height % 2  # yuv420p needs even sizes
    fps = int(rng.choice(_FRAME_RATES))
    num_frames = round(rng.uniform(1.5, 2.5) * fps)
    with av.open(path, "w", format="mp4") as container:
        stream = container.add_stream("libx264", rate=fps)
        stream.width, stream.height, stream.pix_fmt = width, height, "yuv420p"
        stream.codec_context.gop_size = fps  # a keyframe a second: clips are reached by seeking
        # Same bytes for the same seed: one thread, and no macroblock-tree rate control (with it,
        # x264's output varied from process to process here).
        stream.codec_context.thread_count = 1
        stream.options = {"preset": "veryfast", "crf": "20", "x264-params": "mbtree=0"}
        for pixels in _render(label, width, height, fps, num_frames, rng):
            container.mux(stream.encode(av.VideoFrame.from_ndarray(pixels, format="rgb24")))
        container.mux(stream.encode())


def _render(label: int, width: int, height: int, fps: int, num_frames: int, rng):
    """The video's frames (height, width, 3) uint8: one shape over a still background."""
    shape = _shape(rng)
    # any hue, always brighter than the background: "where the shape is" is a simple feature
    color = tuple(
        round(255 * c) for c in colorsys.hsv_to_rgb(rng.uniform(), rng.uniform(0.4, 0.7), 1)
    )
    short = min(width, height)
    size = short * rng.uniform(0.2, 0.28)
    angle0 = rng.uniform(0, 2 * math.pi)
    background = _background(width, height, rng)
    motion = _motion(CLASS_NAMES[label], width, height, num_frames / fps, size, angle0, rng)
    for t in range(num_frames):
        cx, cy, angle, scale = motion(t / fps)
        image = Image.fromarray(background)
        ImageDraw.Draw(image).polygon(_place(shape, cx, cy, angle, scale), fill=color)
        yield np.asarray(image)  # from_ndarray copies; from_image may not (frames are buffered)


def _background(width: int, height: int, rng: np.random.Generator) -> np.ndarray:
    """Smooth, muted colour blobs: a different still background for every video."""
    coarse = rng.integers(0, 256, (rng.integers(3, 7), rng.integers(3, 7), 3)).astype(np.uint8)
    smooth = np.asarray(Image.fromarray(coarse).resize((width, height), Image.BICUBIC), np.float32)
    # dark, muted and still, so the moving shape (bright fill) is the signal
    return np.clip(0.2 * smooth + 24, 0, 255).astype(np.uint8)


def _shape(rng: np.random.Generator) -> np.ndarray:
    """An irregular polygon (unit radius): no rotational symmetry, so rotation sense is visible."""
    corners = int(rng.integers(3, 8))
    while True:  # corners all around the centre (gaps < 0.8π): no slivers
        angles = np.sort(rng.uniform(0, 2 * math.pi, corners))
        if np.diff(angles, append=angles[0] + 2 * math.pi).max() < 0.8 * math.pi:
            break
    radii = rng.uniform(0.45, 0.7, corners)
    radii[0] = 1.0  # one long spike marks the orientation
    return np.stack([radii * np.cos(angles), radii * np.sin(angles)], axis=1)


def _place(shape: np.ndarray, cx: float, cy: float, angle: float, scale: float) -> list[tuple]:
    cos, sin = math.cos(angle), math.sin(angle)
    rotation = np.array([[cos, -sin], [sin, cos]])
    points = shape @ rotation.T * scale + (cx, cy)
    return [tuple(p) for p in points]


def _motion(
    name: str,
    width: int,
    height: int,
    duration: float,
    size: float,
    angle0: float,
    rng: np.random.Generator,
):
    """(cx, cy, angle, scale) as a function of time for a moving, growing or shrinking shape."""
    short = min(width, height)
    # Every class is centred alike and drifts a little, so neither where the shape is nor
    # "something moves" tells the class.
    x0 = rng.uniform(0.35, 0.65) * width
    y0 = rng.uniform(0.35, 0.65) * height
    drift = rng.uniform(-0.02, 0.02, 2) * short
    if name.startswith("move_"):
        # cross most of the frame within the (short) video: a 1 s clip sees a clear shift; the
        # shape may leave the frame in part
        dx, dy = {"left": (-1, 0), "right": (1, 0), "up": (0, -1), "down": (0, 1)}[name[5:]]
        travel = rng.uniform(0.45, 0.6) * (width if dx else height)
        return lambda t: (
            x0 + (dx * travel * (t / duration - 0.5) if dx else drift[0] * t),
            y0 + (dy * travel * (t / duration - 0.5) if dy else drift[1] * t),
            angle0,
            size,
        )
    # Grow / shrink: scale by up to 3x over the video (faster in short ones), from small or large.
    rate = min(rng.uniform(0.35, 0.6), math.log(3.0) / duration)
    small = short * rng.uniform(0.1, 0.14)
    sign = 1 if name == "grow" else -1
    start = small if sign > 0 else small * math.exp(rate * duration)
    return lambda t: (
        x0 + drift[0] * t,
        y0 + drift[1] * t,
        angle0,
        start * math.exp(sign * rate * t),
    )
