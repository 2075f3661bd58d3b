"""Benchmark the video data path (figures for docs/benchmarks.md).

    python jobs/benchmark_data.py                 # all three parts, ~3 min on 2 cores
    python jobs/benchmark_data.py --parts per-core --clips 20

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

Other processes compete for the cores: the load average is printed with the numbers.
"""

from __future__ import annotations

import argparse
import math
import os
import platform
import sys
import tempfile
import time

import av
import numpy as np
from PIL import Image

from morphmlp.data.config import DataConfig

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
        default=["per-core", "pipeline", "memory"],
        choices=["per-core", "pipeline", "memory"],
    )
    parser.add_argument("--clips", type=int, default=12, help="clips per measurement (per-core)")
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
    return args


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


def per_core(paths: dict[str, str], clips: int) -> None:
    """Clips per CPU-second, ours vs decode-everything-then-pick, one thread each."""
    from morphmlp.data.augment import train_augment
    from morphmlp.data.decode import decode_frames, output_size, probe_video
    from morphmlp.data.sampling import clip_indices

    cfg = DataConfig()  # the release's K400 recipe: 16x4, 224, RRC + flip + RandAugment

    def ours(uri, info, rng):
        indices = clip_indices(cfg, info.num_frames, info.fps, clip_idx=-1, num_clips=1, rng=rng)
        frames = decode_frames(uri, indices, short_side=cfg.decode_short_side, threads=1)
        return train_augment(frames, 0, cfg, rng)[0]

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

    for name, uri in paths.items():
        info = probe_video(uri)
        result = {"video": name, "frames": info.num_frames, "seconds": info.duration_sec}
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


def pipeline(paths: dict[str, str], cpus: int, args: argparse.Namespace) -> dict:
    """Steady-state clips/s of build_train_dataset on `cpus` cores, and decode actor memory."""
    import psutil
    import pyarrow as pa
    import ray

    from morphmlp.data.decode import probe_video
    from morphmlp.data.index import VideoIndex
    from morphmlp.data.pipeline import build_train_dataset

    uris = [paths["h264-320p"], paths["vp9-320p"]] * 8
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
    """(rss, uss, pss) of every live decode actor process (Ray titles them ray::MapWorker...)."""
    found = []
    for proc in psutil.process_iter(["cmdline"]):
        cmdline = proc.info["cmdline"] or []
        if cmdline and cmdline[0].startswith("ray::MapWorker"):
            try:
                mem = proc.memory_full_info()
            except psutil.Error:
                continue
            found.append((mem.rss, mem.uss, mem.pss))
    return found


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    load = os.getloadavg()
    print(
        f"{platform.machine()} {os.cpu_count()} cores, Pillow {Image.__version__}, PyAV "
        f"{av.__version__}; load average at start {load[0]:.2f} {load[1]:.2f} {load[2]:.2f}",
        flush=True,
    )
    with tempfile.TemporaryDirectory() as tmp:
        folder = args.workdir or tmp
        os.makedirs(folder, exist_ok=True)
        paths = make_videos(folder, args.seconds)
        if "per-core" in args.parts:
            print("Training clips per CPU core (16x4, 224², full augmentation):", flush=True)
            per_core(paths, args.clips)
        if "pipeline" in args.parts or "memory" in args.parts:
            print("Ray Data pipeline, steady state:", flush=True)
            # Pairs alternate 1 and 2 cores, so slow spells of the machine hit both sides.
            rates: dict[int, list[float]] = {1: [], 2: []}
            for _ in range(args.pipeline_repeats):
                for cpus in (1, 2):
                    rates[cpus].append(pipeline(paths, cpus, args)["clips_per_s"])
                print(f"  2 CPUs / 1 CPU: {rates[2][-1] / rates[1][-1]:.2f}x", flush=True)
            if args.pipeline_repeats > 1:
                one, two = np.median(rates[1]), np.median(rates[2])
                print(
                    f"  median of {args.pipeline_repeats} pairs: 1 CPU {one:.2f} clips/s, "
                    f"2 CPUs {two:.2f} clips/s, 2 CPUs / 1 CPU: {two / one:.2f}x",
                    flush=True,
                )
    load = os.getloadavg()
    print(f"load average at end {load[0]:.2f} {load[1]:.2f} {load[2]:.2f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
