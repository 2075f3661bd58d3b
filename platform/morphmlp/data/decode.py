"""PyAV decoding straight from storage: probe a video, decode only the frames a clip needs.

The file is opened through pyarrow.fs (local, s3://, gs://) as a seekable handle, so FFmpeg reads
only the byte ranges it asks for: no copy of the whole object to disk. Decoding seeks to the
keyframe before the first wanted frame, decodes until the last one and keeps only the wanted
frames: converted (and scaled to the wanted short side, in one swscale call) to RGB by
decode_frames, or as YUV planes by decode_clip, whose crops go from the stored picture to the
crop size in one swscale call. Full-resolution RGB frames are never materialised. Every failure
becomes a VideoDecodeError with a reason from VideoDecodeError.REASONS, which the bad-data
ledger records. BAD_DATA_ERRORS is what a video
or its storage can raise; callers catch only those, so that a bug in the code fails loudly.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass

import av
import numpy as np
import pyarrow as pa
from av.video.reformatter import VideoReformatter

from morphmlp import storage
from morphmlp.data.errors import VideoDecodeError
from morphmlp.errors import StorageError

# The exceptions that mean "this video (or the storage holding it) is bad": classified decode
# failures, FFmpeg errors that escaped classification, and I/O errors of the file handle (PyAV
# re-raises those of its Python file object; pyarrow's ArrowIOError is an OSError). Anything else
# (TypeError, NameError, AttributeError, ...) is a bug in the code: recorded as bad data, it would
# read as "every video is bad", so it is never caught on the decode path.
BAD_DATA_ERRORS: tuple[type[Exception], ...] = (
    VideoDecodeError,
    av.error.FFmpegError,
    OSError,
    StorageError,
    pa.ArrowInvalid,
)

# FFmpeg reads through Python in chunks of this size; on object stores each chunk is one ranged
# GET, so it is much larger than PyAV's 32 KiB default.
_IO_BUFFER = 1 << 20
# Wanted frames further apart than this (in frames) are reached by a new seek instead of decoding
# through the gap: a keyframe is rarely more than a few seconds away.
_SEEK_GAP_SECONDS = 3.0
# An index's frame count may overstate what decodes by a frame or two (edit lists, rate
# rounding); fewer than that many missing frames are filled with the last frame, more is truncation.
_MISSING_FRAMES_TOLERANCE = 2

# Pixel formats cropped as they are (yuvj420p: the same layout, full range).
_YUV420 = ("yuv420p", "yuvj420p")

# Leading bytes of containers we expect: if one of these can't be opened, it was cut short.
_SIGNATURES = (
    (4, b"ftyp"),  # MP4 / MOV
    (0, b"\x1a\x45\xdf\xa3"),  # Matroska / WebM
    (0, b"RIFF"),  # AVI
)


@dataclass(frozen=True)
class VideoInfo:
    """What the index stores about a video (probed once, used to plan every clip)."""

    duration_sec: float
    fps: float
    num_frames: int
    width: int
    height: int
    codec: str


def probe_video(uri: str) -> VideoInfo:
    """Read a video's metadata and decode its first frame (proof the stream is readable)."""
    with _open(uri) as (container, stream):
        fps = _fps(uri, stream)
        num_frames = stream.frames
        if num_frames <= 0:
            # WebM/Matroska headers carry no frame count: count packets (demux only, no decode).
            container.seek(0)
            num_frames = _guard(
                uri, "unreadable_stream", lambda: sum(1 for p in container.demux(stream) if p.size)
            )
            container.seek(0)
        if num_frames <= 0:
            raise VideoDecodeError(storage.redact(uri), "unreadable_stream", "no video packets")
        if stream.duration is not None:
            duration = float(stream.duration * stream.time_base)
        elif container.duration is not None:
            duration = container.duration / av.time_base
        else:
            duration = num_frames / fps
        if stream.frames <= 0 and num_frames < 0.9 * duration * fps - _MISSING_FRAMES_TOLERANCE:
            raise VideoDecodeError(
                storage.redact(uri),
                "truncated",
                f"{num_frames} frames where the header's {duration:.2f}s at {fps:g} fps promise "
                f"{round(duration * fps)}",
            )
        first = _guard(uri, "unreadable_stream", lambda: next(container.decode(stream), None))
        if first is None:
            raise VideoDecodeError(
                storage.redact(uri), "unreadable_stream", "the video stream decodes no frames"
            )
        return VideoInfo(
            duration_sec=duration,
            fps=fps,
            num_frames=int(num_frames),
            width=stream.codec_context.width,
            height=stream.codec_context.height,
            codec=stream.codec_context.name,
        )


def decode_frames(
    uri: str, indices: Sequence[int], *, short_side: int | None = None, threads: int = 1
) -> np.ndarray:
    """Frames `indices` (0-based, may repeat) as uint8 (len(indices), H, W, 3) RGB.

    short_side scales every frame so that its shorter side has that many pixels (the longer one
    floor(long / short * short_side), as PySlowFast does); None keeps the stored size.
    """
    # frame.reformat() on a new frame builds a new swscale context (~0.2 ms, as much as scaling a
    # 224² crop): a clip's conversions share one VideoReformatter, which keeps its context while
    # sizes and formats stay the same (DecodedClip.crop does the same).
    reformatter, reformat_threads = VideoReformatter(), threads or None
    return np.stack(
        _decode(
            uri,
            indices,
            threads,
            lambda frame: _to_rgb(reformatter, frame, short_side, reformat_threads),
        )
    )


def decode_clip(uri: str, indices: Sequence[int], *, threads: int = 1) -> DecodedClip:
    """Frames `indices` kept as the decoder made them (YUV 4:2:0), to be cropped later.

    Training crops a video several times (data.num_samples), each time a different box: cutting
    the box out of the stored picture and scaling it to the crop size in one swscale call costs
    about half of converting the whole frame to RGB at the decode size and resampling the box
    from that (docs/benchmarks.md), and it is one resample from the decoded frame, as the
    release's crop is.
    """
    return DecodedClip(_decode(uri, indices, threads, _Planes.of))


def _decode(uri: str, indices: Sequence[int], threads: int, convert: Callable) -> list:
    """convert(frame) for frames `indices`, in that order: decode, check, fill."""
    wanted = sorted({int(i) for i in indices})
    if not wanted or wanted[0] < 0:
        raise ValueError(f"frame indices must be >= 0, got {list(indices)[:8]}")
    with _open(uri) as (container, stream):
        stream.thread_type = "AUTO"
        stream.codec_context.thread_count = threads
        reader = _Reader(container, stream, _fps(uri, stream), convert)
        _guard(uri, "unreadable_stream", lambda: reader.read(wanted))
    kept = reader.kept
    if not kept:
        raise VideoDecodeError(storage.redact(uri), "unreadable_stream", "decoded no frames")
    last = max(kept)
    if wanted[-1] - last > _MISSING_FRAMES_TOLERANCE:
        how = f"breaks ({reader.broken})" if reader.broken else "ends"
        raise VideoDecodeError(
            storage.redact(uri),
            "truncated",
            f"the stream {how} at frame {last} but frame {wanted[-1]} was wanted",
        )
    sizes = {frame.shape[:2] for frame in kept.values()}
    if len(sizes) > 1:  # np.stack would fail; it is the stream's fault, not the code's
        raise VideoDecodeError(
            storage.redact(uri),
            "unreadable_stream",
            f"the frame size changes mid-stream {sorted(s[::-1] for s in sizes)} (width, height)",
        )
    # Fill frames the stream lacks (within tolerance) with the nearest earlier decoded one.
    available = sorted(kept)
    out = []
    for i in indices:
        j = np.searchsorted(available, i, side="right") - 1
        out.append(kept[available[max(j, 0)]])
    return out


class DecodedClip:
    """A clip's frames as decoded (YUV 4:2:0 planes), cut and scaled to RGB crops on demand."""

    def __init__(self, frames: list[_Planes]):
        self.frames = frames
        self.height, self.width = frames[0].shape

    def __len__(self) -> int:
        return len(self.frames)

    def crop(self, box: tuple[float, float, float, float], size: int) -> np.ndarray:
        """The box (left, top, right, bottom; in stored pixels) of every frame, scaled to
        size x size RGB (swscale, bilinear): uint8 (T, size, size, 3).

        The box snaps to even pixels (at most one pixel per side), where 4:2:0 chroma samples are.
        """
        left, top = (int(v) // 2 * 2 for v in box[:2])
        right = max(left + 2, min(self.width // 2 * 2, round(box[2] / 2) * 2))
        bottom = max(top + 2, min(self.height // 2 * 2, round(box[3] / 2) * 2))
        reformatter = VideoReformatter()
        return np.stack(
            [frame.crop_rgb(reformatter, (left, top, right, bottom), size) for frame in self.frames]
        )


class _Planes:
    """One decoded frame's Y, U and V planes (copied out of the decoder's buffers)."""

    def __init__(self, y, u, v, colorspace, color_range):
        self.planes = (y, u, v)
        self.colorspace, self.color_range = colorspace, color_range
        self.shape = y.shape

    @classmethod
    def of(cls, frame: av.VideoFrame) -> _Planes:
        colorspace, color_range = frame.colorspace, frame.color_range
        if frame.format.name not in _YUV420:
            # 10-bit, 4:2:2, 4:4:4, ...: converted once to 8-bit 4:2:0 at the stored size.
            frame = frame.reformat(format="yuv420p", threads=1)
        planes = [
            np.frombuffer(plane, np.uint8).reshape(plane.height, plane.line_size)[:, : plane.width]
            for plane in frame.planes
        ]
        return cls(*(np.array(plane) for plane in planes), colorspace, color_range)

    def crop_rgb(
        self, reformatter: VideoReformatter, box: tuple[int, ...], size: int
    ) -> np.ndarray:
        left, top, right, bottom = box
        y, u, v = self.planes
        width = right - left
        # from_ndarray's yuv420p layout: the Y rows, then U and V, each flattened to rows of width.
        packed = np.concatenate(
            [
                y[top:bottom, left:right].ravel(),
                u[top // 2 : bottom // 2, left // 2 : right // 2].ravel(),
                v[top // 2 : bottom // 2, left // 2 : right // 2].ravel(),
            ]
        ).reshape(-1, width)
        frame = av.VideoFrame.from_ndarray(packed, format="yuv420p")
        frame.colorspace, frame.color_range = self.colorspace, self.color_range
        rgb = reformatter.reformat(frame, width=size, height=size, format="rgb24", threads=1)
        return rgb.to_ndarray()


def output_size(width: int, height: int, short_side: int | None) -> tuple[int, int]:
    """(width, height) after scaling the short side to `short_side`."""
    if short_side is None:
        return width, height
    if width <= height:
        return short_side, math.floor(height / width * short_side)
    return math.floor(width / height * short_side), short_side


class _Reader:
    """Decodes the wanted frames of an open stream into `kept` (index -> RGB array).

    A decoding error after frames were decoded is taken as the end of the stream (`broken` says
    why): whether that is truncation is judged by which wanted frames are missing. `decoded`
    counts the frames that came out of the decoder (the skipped ones never do).
    """

    def __init__(self, container, stream, fps: float, convert: Callable):
        self.container = container
        self.stream = stream
        self.fps = fps
        self.convert = convert
        self.kept: dict = {}
        self.broken: str | None = None
        self.decoded = 0

    def read(self, wanted: list[int]) -> None:
        gap = max(1, round(_SEEK_GAP_SECONDS * self.fps))
        groups: list[list[int]] = [[wanted[0]]]
        for i in wanted[1:]:
            if i - groups[-1][-1] > gap:
                groups.append([i])
            else:
                groups[-1].append(i)
        for group in groups:
            if not self._read_group(group):
                # The seek landed after the wanted frame, or frames carry no timestamps: decode
                # from the start and count frames instead.
                self._read_sequential(wanted)
                return

    def _index(self, pts: int) -> int:
        """Frame index of a presentation timestamp."""
        origin = self.stream.start_time or 0
        return round(float((pts - origin) * self.stream.time_base) * self.fps)

    def _read_group(self, group: list[int]) -> bool:
        origin = self.stream.start_time or 0
        wanted = set(group)
        # Aim half a frame early so rounding in the timestamps can't skip the first wanted frame.
        target = origin + max(0, int((group[0] - 0.5) / self.fps / self.stream.time_base))
        self.container.seek(target, stream=self.stream, backward=True, any_frame=False)
        first = True
        for frame in self._decoded(wanted):
            if frame.pts is None:
                return False
            index = self._index(frame.pts)
            if first and index > group[0]:
                return False
            first = False
            if index in wanted:
                self.kept[index] = self.convert(frame)
            if index >= group[-1]:
                break
        return True

    def _read_sequential(self, wanted: list[int]) -> None:
        self.container.seek(0)
        wanted_set = set(wanted)
        for index, frame in enumerate(self._decoded()):
            if index in wanted_set:
                self.kept[index] = self.convert(frame)
            if index >= wanted[-1]:
                break

    def _decoded(self, wanted: set[int] | None = None) -> Iterator[av.VideoFrame]:
        """Decoded frames from the current position. A packet whose frame is not `wanted` is
        decoded only if other frames reference it: that covers the keyframe-to-clip preroll (most
        of the work) and the frames between a clip's samples (3 of 4 at stride 4); for x264's
        default B-frames, about half of them are non-reference. A non-reference frame is, by
        definition, read by no other frame, so every frame that is decoded is bit-identical to a
        full decode (tests/test_data_decode.py checks H.264 with B-frames and VP9)."""
        context = self.stream.codec_context
        try:
            for packet in self.container.demux(self.stream):
                if wanted is not None and packet.pts is not None:
                    needed = self._index(packet.pts) in wanted
                    context.skip_frame = "DEFAULT" if needed else "NONREF"
                for frame in packet.decode():
                    self.decoded += 1
                    yield frame
        except av.error.FFmpegError as err:
            if not self.kept:
                raise
            self.broken = str(err)
        finally:
            context.skip_frame = "DEFAULT"


def _to_rgb(
    reformatter: VideoReformatter, frame, short_side: int | None, threads: int | None = 1
) -> np.ndarray:
    """threads: swscale's; None is FFmpeg's automatic count (one per core), as the decoder's
    thread_count 0 means."""
    width, height = output_size(frame.width, frame.height, short_side)
    rgb = reformatter.reformat(frame, width=width, height=height, format="rgb24", threads=threads)
    return rgb.to_ndarray()


def _fps(uri: str, stream) -> float:
    rate = stream.average_rate or stream.guessed_rate
    fps = float(rate) if rate else 0.0
    if not 0 < fps <= 1000:
        raise VideoDecodeError(storage.redact(uri), "unreadable_stream", f"frame rate {rate!r}")
    return fps


@contextlib.contextmanager
def _open(uri: str) -> Iterator[tuple[av.container.InputContainer, av.video.stream.VideoStream]]:
    redacted = storage.redact(uri)
    try:
        handle = storage.open_input_file(uri)
    except FileNotFoundError as err:
        raise VideoDecodeError(redacted, "missing", "no such file") from err
    except OSError as err:
        if "does not exist" in str(err) or "not found" in str(err).lower():
            raise VideoDecodeError(redacted, "missing", "no such file") from err
        raise VideoDecodeError(redacted, "io_error", str(err)) from err
    with handle:
        if handle.size() == 0:
            raise VideoDecodeError(redacted, "empty", "zero-byte file")
        try:
            container = av.open(handle, mode="r", buffer_size=_IO_BUFFER)
        except av.error.FFmpegError as err:
            handle.seek(0)
            head = handle.read(12)
            if any(head[at : at + len(sig)] == sig for at, sig in _SIGNATURES):
                raise VideoDecodeError(
                    redacted, "truncated", f"container header unreadable ({err.strerror})"
                ) from err
            raise VideoDecodeError(
                redacted, "not_video", f"not a video FFmpeg can read ({err.strerror})"
            ) from err
        with container:
            if not container.streams.video:
                raise VideoDecodeError(redacted, "no_video_stream", "the file has no video stream")
            yield container, container.streams.video[0]


def _guard(uri: str, reason: str, fn):
    """Run fn; FFmpeg errors become VideoDecodeError(reason)."""
    try:
        return fn()
    except av.error.FFmpegError as err:
        raise VideoDecodeError(storage.redact(uri), reason, str(err)) from err
