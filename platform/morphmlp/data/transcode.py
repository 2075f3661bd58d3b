"""Re-encode an indexed dataset for cheap decoding, on Ray: short side N, a keyframe every K frames.

A training clip costs the decode from the keyframe before it to its last frame, at the stored size.
Kinetics videos keep YouTube's spacing (x264's default: up to 250 frames between keyframes, more
where scene cuts add none) and sizes up to 1080p, while the recipe samples 16 frames at stride 4
and decodes at short side 256. Re-encoding once to short side 320 (what the release's DATASET.md
and MMAction2's `resize_videos.py` do by hand, on one machine) with a keyframe every 16 frames
bounds both the pixels and the preroll of every clip. Here it runs as one Ray task per video
across the cluster; the tasks import PyAV, numpy and pyarrow, never torch.

Output: H.264 (libx264, yuv420p, constant frame rate, no audio) in mp4 with the header first
(`+faststart`: a reader on object storage needs no seek to the end), under the destination folder
at the source's path relative to the source index's folder, and a new index next to them:
<out>/index.parquet (same labels, splits, class names and clip windows; probed metadata of the new
files) and <out>/index.rejects.csv (videos that could not be read, one row per index row, with the
reason).

Trimmed samples (start_sec / end_sec) keep their windows: every file is transcoded whole, frame
for frame at its own rate, so a window names the same frames in the new file as in the old one.
Cutting each window out instead would make rows that share a raw video (Kinetics) each need their
own file, and a clip window that the index later widens would find its frames gone.

Each output appears atomically: encoded to a temporary name, probed, then moved into place (a
rename locally; on object stores one upload, which becomes visible only once complete). A re-run
probes the outputs that exist and keeps those with the right size, frame count and encoding
settings (recorded in the file's `comment` tag), so an interrupted run resumes where it stopped.
"""

from __future__ import annotations

import dataclasses
import logging
import os
import posixpath
import shutil
import tempfile
import time
import uuid
from collections import Counter
from dataclasses import dataclass
from fractions import Fraction

import av
import pyarrow as pa
import pyarrow.fs as pafs
from av.video.frame import PictureType

from morphmlp import storage
from morphmlp.config import check, check_positive
from morphmlp.data.decode import BAD_DATA_ERRORS, VideoInfo, probe_video
from morphmlp.data.errors import VideoDecodeError
from morphmlp.data.index import REJECTS_SCHEMA, VideoIndex, read_index, write_index, write_rejects
from morphmlp.data.probe import failure_record, format_duration
from morphmlp.errors import MorphMLPError, StorageError

log = logging.getLogger(__name__)

INDEX_NAME = "index.parquet"
REJECTS_NAME = "index.rejects.csv"
# Frames an output may lack against the source index before the source counts as truncated (the
# decoder's own tolerance: edit lists and rate rounding make headers overstate by a frame or two).
_FRAME_TOLERANCE = 2
_COMMENT_PREFIX = "morphmlp-transcode"
_IO_BUFFER = 1 << 20
X264_PRESETS = (
    "ultrafast",
    "superfast",
    "veryfast",
    "faster",
    "fast",
    "medium",
    "slow",
    "slower",
    "veryslow",
)


class TranscodeError(MorphMLPError):
    """A transcode that can't start (destination, sources) or that produced no video at all."""


@dataclass
class TranscodeConfig:
    short_side: int = 320  # outputs' shorter side; smaller videos keep their size (never upscaled)
    # Frames from one keyframe to the next, exactly (scene-cut keyframes off). 0: x264's default
    # spacing (keyint 250 with scene cuts), for measuring what the spacing alone is worth.
    keyframe_interval: int = 16
    crf: int = 23  # x264's default quality
    preset: str = "medium"  # x264's default speed/size trade-off
    cpus_per_task: float = 1.0  # one task per video; x264 and the decoder get this many threads
    log_every_videos: int = 100  # progress line after this many videos ...
    log_every_seconds: float = 30.0  # ... or this many seconds, whichever comes first

    def __post_init__(self) -> None:
        # H.264 yuv420p halves the chroma planes: frame sizes must be even.
        check(
            "transcode",
            self,
            "short_side",
            _is_int(self.short_side) and self.short_side >= 32 and self.short_side % 2 == 0,
            "an even integer >= 32",
        )
        check(
            "transcode",
            self,
            "keyframe_interval",
            _is_int(self.keyframe_interval) and self.keyframe_interval >= 0,
            "an integer >= 1 (frames from one keyframe to the next), or 0 for x264's default",
        )
        check("transcode", self, "crf", _is_int(self.crf) and 0 <= self.crf <= 51, "in 0..51")
        check("transcode", self, "preset", self.preset in X264_PRESETS, f"one of {X264_PRESETS}")
        check_positive("transcode", self, "cpus_per_task", "log_every_seconds")
        check(
            "transcode",
            self,
            "log_every_videos",
            _is_int(self.log_every_videos) and self.log_every_videos >= 1,
            "an integer >= 1",
        )

    def comment(self) -> str:
        """The settings tag written into every output (a re-run keeps only matching files)."""
        return (
            f"{_COMMENT_PREFIX} short_side={self.short_side} "
            f"keyframe_interval={self.keyframe_interval} crf={self.crf} preset={self.preset}"
        )

    @property
    def threads(self) -> int:
        return max(1, int(self.cpus_per_task))


@dataclass
class TranscodeResult:
    index_uri: str
    rejects_uri: str
    rows: int  # rows of the new index
    videos: int  # distinct source videos
    encoded: int
    skipped: int  # already done by an earlier run
    rejected: int


def target_size(width: int, height: int, short_side: int) -> tuple[int, int]:
    """(width, height) of the output: short side `short_side`, never larger than the source, both
    even (yuv420p halves the chroma planes); the long side keeps the aspect ratio."""
    if min(width, height) <= short_side:
        return max(2, width - width % 2), max(2, height - height % 2)
    if width <= height:
        return short_side, max(2, 2 * round(height * short_side / width / 2))
    return max(2, 2 * round(width * short_side / height / 2)), short_side


def output_uris(uris: list[str], source_base: str, out_root: str) -> dict[str, str]:
    """Source URI -> output URI: the source's path relative to the source index's folder (or,
    for a source outside it, its file name), as .mp4 under out_root; names that would collide
    (a.webm and a.mp4) get a short hash of the source URI."""
    prefix = source_base.rstrip("/") + "/"
    names: dict[str, str] = {}
    for uri in sorted(set(uris)):
        relative = uri[len(prefix) :] if uri.startswith(prefix) else posixpath.basename(uri)
        names[uri] = posixpath.splitext(relative.replace(os.sep, "/"))[0] + ".mp4"
    counts = Counter(names.values())
    out = {}
    for uri, name in names.items():
        if counts[name] > 1:
            stem = name[: -len(".mp4")]
            name = f"{stem}-{uuid.uuid5(uuid.NAMESPACE_URL, uri).hex[:8]}.mp4"
        out[uri] = storage.join(out_root, *name.split("/"))
    return out


@dataclass
class TranscodePlan:
    """What a transcode will do, checked before any video is touched (no Ray needed)."""

    index: VideoIndex
    index_uri: str
    out_uri: str
    cfg: TranscodeConfig
    outputs: dict[str, str]  # source URI -> output URI, one entry per distinct video
    jobs: list[tuple[str, str, tuple[int, int], int]]  # (source, output, size, index frames)

    @property
    def new_index_uri(self) -> str:
        return storage.join(self.out_uri, INDEX_NAME)

    @property
    def rejects_uri(self) -> str:
        return storage.join(self.out_uri, REJECTS_NAME)


def plan_transcode(
    index_uri: str, out_uri: str, cfg: TranscodeConfig | None = None
) -> TranscodePlan:
    """Check the destination (first: a typo'd bucket must not cost a pass over the sources) and
    the source index, and name every output. Raises MorphMLPError subclasses."""
    cfg = cfg or TranscodeConfig()
    try:
        storage.check_writable(out_uri)
    except StorageError as err:
        raise TranscodeError(f"destination {err}") from err
    index = read_index(index_uri)
    uris = index.table["uri"].to_pylist()
    outputs = output_uris(uris, storage.parent(index_uri), out_uri)
    for source, target in outputs.items():
        if _same(source, target):
            raise TranscodeError(
                f"--out {storage.redact(out_uri)}: the output {storage.redact(target)} would "
                "overwrite its source; choose another folder"
            )
    if _same(storage.join(out_uri, INDEX_NAME), index_uri):
        raise TranscodeError(
            f"--out {storage.redact(out_uri)}: the new index would overwrite the source index "
            f"{storage.redact(index_uri)}; choose another folder"
        )
    # Expected size and frames of each output, from the index's first row of that video.
    table = index.table
    widths, heights = table["width"].to_pylist(), table["height"].to_pylist()
    frames = table["num_frames"].to_pylist()
    first_row: dict[str, int] = {}
    for row, uri in enumerate(uris):
        first_row.setdefault(uri, row)
    jobs = [
        (
            source,
            target,
            target_size(widths[first_row[source]], heights[first_row[source]], cfg.short_side),
            frames[first_row[source]],
        )
        for source, target in outputs.items()
    ]
    return TranscodePlan(index, index_uri, out_uri, cfg, outputs, jobs)


def transcode_index(
    index_uri: str, out_uri: str, cfg: TranscodeConfig | None = None
) -> TranscodeResult:
    """plan_transcode, then run_transcode (Ray must be initialised)."""
    return run_transcode(plan_transcode(index_uri, out_uri, cfg))


def run_transcode(plan: TranscodePlan) -> TranscodeResult:
    """Transcode every video of the plan in Ray tasks (Ray must be initialised), then write the
    new index and the rejects file. Raises TranscodeError when no video at all could be
    transcoded (no index is written then)."""
    import ray

    cfg, index_uri, out_uri = plan.cfg, plan.index_uri, plan.out_uri
    new_index_uri, rejects_uri = plan.new_index_uri, plan.rejects_uri
    index, table = plan.index, plan.index.table
    uris = table["uri"].to_pylist()
    task = ray.remote(num_cpus=cfg.cpus_per_task)(transcode_video)
    cpus = float(ray.cluster_resources().get("CPU", 1.0))
    max_in_flight = max(2, int(2 * cpus / cfg.cpus_per_task))
    todo = iter(plan.jobs)
    remaining = len(plan.jobs)
    pending: dict = {}
    outcomes: dict[str, dict] = {}
    counts = Counter()
    started = last_log = time.monotonic()
    logged = 0
    log.info(
        "transcoding %d videos (%d index rows) of %s to %s: %s",
        len(plan.jobs),
        len(uris),
        storage.redact(index_uri),
        storage.redact(out_uri),
        cfg.comment(),
    )
    while remaining or pending:
        while remaining and len(pending) < max_in_flight:
            source, target, size, expected_frames = next(todo)
            remaining -= 1
            ref = task.remote(source, target, size, expected_frames, cfg)
            pending[ref] = source
        done, _ = ray.wait(list(pending), num_returns=1, timeout=cfg.log_every_seconds)
        for ref in done:
            source = pending.pop(ref)
            outcome = ray.get(ref)
            outcomes[source] = outcome
            counts[outcome["status"]] += 1
            if outcome["status"] == "rejected":
                log.warning(
                    "skipping unreadable video %s: %s: %s",
                    storage.redact(source),
                    outcome["reason"],
                    outcome["detail"],
                )
        finished = len(outcomes)
        now = time.monotonic()
        if (
            finished - logged >= cfg.log_every_videos
            or now - last_log >= cfg.log_every_seconds
            or not (remaining or pending)
        ):
            rate = finished / max(now - started, 1e-9)
            eta = (len(plan.jobs) - finished) / rate if rate else float("inf")
            log.info(
                "transcoded %d/%d videos (%d encoded, %d already done, %d rejected), %.2f "
                "videos/s, ETA %s",
                finished,
                len(plan.jobs),
                counts["encoded"],
                counts["skipped"],
                counts["rejected"],
                rate,
                format_duration(eta),
            )
            last_log, logged = now, finished

    keep, rejects = [], []
    for row, uri in enumerate(uris):
        outcome = outcomes[uri]
        if outcome["status"] == "rejected":
            rejects.append(
                {"uri": storage.redact(uri), "row": row}
                | {k: outcome[k] for k in ("reason", "error_type", "detail")}
            )
        else:
            keep.append(row)
    rejects_table = pa.Table.from_pylist(rejects, schema=REJECTS_SCHEMA)
    write_rejects(rejects_table, rejects_uri)
    if not keep:
        first = rejects[0]
        raise TranscodeError(
            f"{storage.redact(index_uri)}: none of its {len(plan.jobs)} videos could be transcoded "
            f"(first: {first['uri']}: {first['reason']}: {first['detail']}); reasons per row in "
            f"{storage.redact(rejects_uri)}"
        )
    rows = table.take(pa.array(keep, pa.int64()))
    kept_sources = [uris[r] for r in keep]
    columns = {name: rows[name] for name in ("label", "split", "start_sec", "end_sec")}
    columns["uri"] = pa.array([plan.outputs[u] for u in kept_sources], pa.string())
    for field in dataclasses.fields(VideoInfo):
        columns[field.name] = pa.array([outcomes[u]["info"][field.name] for u in kept_sources])
    new = VideoIndex(pa.table(columns), list(index.class_names), new_index_uri, out_uri)
    write_index(new, None, new_index_uri)
    log.info(
        "wrote %s: %d rows in %s; %d videos encoded, %d already done, %d rejected -> %s",
        storage.redact(new_index_uri),
        len(new),
        dict(sorted(Counter(rows["split"].to_pylist()).items())),
        counts["encoded"],
        counts["skipped"],
        counts["rejected"],
        storage.redact(rejects_uri),
    )
    return TranscodeResult(
        index_uri=new_index_uri,
        rejects_uri=rejects_uri,
        rows=len(new),
        videos=len(plan.jobs),
        encoded=counts["encoded"],
        skipped=counts["skipped"],
        rejected=counts["rejected"],
    )


def transcode_video(
    source: str,
    target: str,
    size: tuple[int, int],
    expected_frames: int,
    cfg: TranscodeConfig,
) -> dict:
    """One video (runs in a Ray task): {"status": "skipped" | "encoded", "info": VideoInfo
    fields of the output} or {"status": "rejected", reason, error_type, detail}."""
    try:
        done = _finished_output(target, size, expected_frames, cfg)
        if done is not None:
            return {"status": "skipped", "info": dataclasses.asdict(done)}
        probe_video(source)  # classifies a bad source (missing, empty, not a video, ...)
        info = _encode_atomically(source, target, size, expected_frames, cfg)
        return {"status": "encoded", "info": dataclasses.asdict(info)}
    except BAD_DATA_ERRORS as err:  # one bad video (or a failed upload) must not stop the others;
        # a bug in the code must, so nothing else is caught. A failed upload is reported as
        # io_error: no output exists, so a re-run tries that video again.
        return {"status": "rejected", **failure_record(err)}


def _finished_output(
    target: str, size: tuple[int, int], expected_frames: int, cfg: TranscodeConfig
) -> VideoInfo | None:
    """The probed output if an earlier run finished it with these settings, else None."""
    if not storage.exists(target):
        return None
    try:
        info = probe_video(target)
        with (
            storage.open_input_file(target) as handle,
            av.open(handle, buffer_size=_IO_BUFFER) as c,
        ):
            comment = c.metadata.get("comment", "")
    except (VideoDecodeError, av.error.FFmpegError, OSError) as err:
        log.info("re-encoding %s: the existing output is unreadable (%s)", target, err)
        return None
    if (info.width, info.height) != size or comment != cfg.comment():
        return None
    if info.num_frames < expected_frames - _FRAME_TOLERANCE:
        return None
    return info


def _encode_atomically(
    source: str, target: str, size: tuple[int, int], expected_frames: int, cfg: TranscodeConfig
) -> VideoInfo:
    local_target = _is_local(target)
    if local_target:
        _, path = storage.resolve(target)
        folder = os.path.dirname(path)
        try:
            os.makedirs(folder, exist_ok=True)
        except OSError as err:
            raise StorageError(
                f"{storage.redact(target)}: can't create its folder ({err})"
            ) from err
    else:
        folder = tempfile.gettempdir()
    # A hidden temporary name beside the target, so the final rename stays on one filesystem.
    tmp = os.path.join(folder, f".{posixpath.basename(target)}.tmp-{uuid.uuid4().hex[:8]}")
    try:
        decoded = _encode(source, tmp, size, cfg)
        if decoded < expected_frames - _FRAME_TOLERANCE:
            raise VideoDecodeError(
                storage.redact(source),
                "truncated",
                f"decoded {decoded} frames where the index has {expected_frames}",
            )
        info = probe_video(tmp)
        if (info.width, info.height) != size:  # never expected; a wrong file must not appear
            raise RuntimeError(f"encoded {info.width}x{info.height} where {size} was wanted")
        if local_target:
            os.replace(tmp, path)
        else:
            _upload(tmp, target)
        return info
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


def _encode(source: str, tmp: str, size: tuple[int, int], cfg: TranscodeConfig) -> int:
    """Decode `source`, scale every frame to `size`, encode to the local file `tmp`; returns the
    number of frames. A decoding error after some frames ends the stream (the caller judges by
    the count whether that is truncation)."""
    width, height = size
    options = {"crf": str(cfg.crf), "preset": cfg.preset, "threads": str(cfg.threads)}
    if cfg.keyframe_interval:
        # keyint_min = g and no scene-cut keyframes: exactly one keyframe every g frames, so a
        # clip's preroll is bounded by g (x264's scene cuts would add keyframes, and its default
        # min-keyint lets them shift the grid).
        options |= {
            "g": str(cfg.keyframe_interval),
            "keyint_min": str(cfg.keyframe_interval),
            "sc_threshold": "0",
        }
    count = 0
    with (
        storage.open_input_file(source) as handle,
        av.open(handle, buffer_size=_IO_BUFFER) as src,
        av.open(tmp, "w", format="mp4", options={"movflags": "+faststart"}) as dst,
    ):
        in_stream = src.streams.video[0]
        in_stream.thread_type = "AUTO"
        in_stream.codec_context.thread_count = cfg.threads
        rate = in_stream.average_rate or in_stream.guessed_rate
        rate = Fraction(rate).limit_denominator(1_000_000)
        dst.metadata["comment"] = cfg.comment()
        out = dst.add_stream("libx264", rate=rate, options=options)
        out.width, out.height, out.pix_fmt = width, height, "yuv420p"
        time_base = 1 / rate
        out.codec_context.time_base = time_base
        if cfg.keyframe_interval:
            out.codec_context.gop_size = cfg.keyframe_interval
        try:
            for frame in src.decode(in_stream):
                # Constant rate, one output frame per decoded frame: frame i stays at i / fps,
                # which is how the decoder and the index's clip windows count frames.
                scaled = frame.reformat(
                    width=width,
                    height=height,
                    format="yuv420p",
                    interpolation="BICUBIC",  # FFmpeg's scale filter's default
                    threads=1,
                )
                scaled.pts = count
                # The source's own keyframes arrive as pict_type I, which libx264 turns into
                # forced keyframes off the grid: the encoder must choose every frame's type.
                scaled.pict_type = PictureType.NONE
                scaled.time_base = time_base
                dst.mux(out.encode(scaled))
                count += 1
        except av.error.FFmpegError as err:
            if not count:
                raise VideoDecodeError(
                    storage.redact(source), "unreadable_stream", str(err)
                ) from err
            log.info("%s: the stream breaks after %d frames (%s)", source, count, err)
        dst.mux(out.encode())
    if not count:
        raise VideoDecodeError(storage.redact(source), "unreadable_stream", "decoded no frames")
    return count


def _upload(local_path: str, target: str) -> None:
    """One upload: an object store shows the object only once it is complete."""
    fs, path = storage.resolve(target)
    try:
        with open(local_path, "rb") as f, fs.open_output_stream(path) as out:
            shutil.copyfileobj(f, out, length=8 << 20)
    except OSError as err:
        raise StorageError(f"{storage.redact(target)}: can't write ({err})") from err


def _is_local(uri: str) -> bool:
    return isinstance(storage.resolve(uri)[0], pafs.LocalFileSystem)


def _same(a: str, b: str) -> bool:
    if _is_local(a) and _is_local(b):
        return storage.resolve(a)[1] == storage.resolve(b)[1]
    return a.rstrip("/") == b.rstrip("/")


def _is_int(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)
