"""The speed tools in jobs/ (speed_*.py) run end to end at tiny sizes and print their figures. They are
not timed here: the figures in docs/benchmarks.md come from full runs."""

from __future__ import annotations

import importlib.util
import json
import re
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


def _run(script: str, *args: str, timeout: int) -> str:
    done = subprocess.run(
        [sys.executable, str(REPO / "jobs" / script), *args],
        capture_output=True,
        text=True,
        timeout=timeout,
        cwd=REPO,
    )
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-3000:]
    return done.stdout


def test_speed_data_pipeline_prints_both_core_counts_and_memory(tmp_path):
    out = _run(
        "speed_data.py",
        "--parts", "pipeline",
        "--seconds", "2",
        "--pipeline-warmup", "0",
        "--pipeline-seconds", "2",
        "--pipeline-repeats", "2",
        "--workdir", str(tmp_path),
        timeout=240,
    )  # fmt: skip
    runs = re.findall(r"(\d) CPU\(s\): ([\d.]+) clips/s; decode actor peak RSS (\d+) MiB", out)
    assert [cpus for cpus, _, _ in runs] == ["1", "2", "1", "2"], out
    assert all(float(rate) > 0 and 100 < int(rss) < 4096 for _, rate, rss in runs), out
    assert len(re.findall(r"^  2 CPUs / 1 CPU: [\d.]+x", out, re.M)) == 2, out
    median = re.search(r"median of 2 pairs: 1 CPU ([\d.]+) clips/s, 2 CPUs ([\d.]+) clips/s", out)
    rates = [float(rate) for _, rate, _ in runs]
    assert median and abs(float(median[1]) - (rates[0] + rates[2]) / 2) < 0.011, out
    assert {p.name for p in tmp_path.iterdir()} >= {"h264-320p.mp4", "vp9-320p.webm"}


@pytest.mark.slow
def test_speed_data_json_on_a_folder_of_videos(tmp_path, make_video):
    """--videos: any folder of videos (nested, H.264 and VP9); --json: the three figures and their
    ratios. The torchcodec baseline is there when torchcodec is, and said to be missing when not."""
    (tmp_path / "videos" / "sub").mkdir(parents=True)
    make_video(str(tmp_path / "videos" / "a.mp4"), width=128, height=96, num_frames=60)
    make_video(str(tmp_path / "videos" / "sub" / "b.webm"), codec="vp9", width=96, height=128)
    (tmp_path / "videos" / "notes.txt").write_text("not a video")
    out = _run(
        "speed_data.py",
        "--parts", "clips-per-cpu",
        "--videos", str(tmp_path / "videos"),
        "--clips", "1",
        "--pipeline-warmup", "0",
        "--pipeline-seconds", "1",
        "--json", str(tmp_path / "figures.json"),
        timeout=240,
    )  # fmt: skip
    figures = json.loads((tmp_path / "figures.json").read_text())
    assert figures["recipe"] == "configs/k400_s16.yaml"
    assert [v["video"] for v in figures["footage"]] == ["a", "sub/b"]
    assert [v["frames_per_keyframe"] for v in figures["footage"]] == [10, 10]
    pipeline, single = (
        figures["pipeline_clips_per_cpu_s"],
        figures["single_process_clips_per_cpu_s"],
    )
    assert pipeline > 0 and single > 0, figures
    assert figures["pipeline"]["clips"] > 0 and figures["pipeline"]["actor_cpu_s"] > 0
    assert figures["pipeline"]["actor_pinned"] is True  # the VM has 2 cores
    assert abs(figures["pipeline_over_single_process"] - pipeline / single) < 1e-9
    assert figures["single_process"]["clips"] >= 2  # --clips per video
    if importlib.util.find_spec("torchcodec") is None:
        assert (
            figures["baseline_clips_per_cpu_s"] is None
            and figures["pipeline_over_baseline"] is None
        )
        assert "baseline: torchcodec is not installed" in out, out
    else:
        baseline = figures["baseline_clips_per_cpu_s"]
        assert baseline > 0 and abs(figures["pipeline_over_baseline"] - pipeline / baseline) < 1e-9
        assert re.search(r"pipeline / baseline [\d.]+x", out), out
    assert re.search(r"pipeline [\d.]+ clips per decode-actor CPU-s", out), out


def test_speed_data_refuses_a_folder_without_videos(tmp_path):
    done = subprocess.run(
        [sys.executable, str(REPO / "jobs" / "speed_data.py"), "--videos", str(tmp_path)],
        capture_output=True,
        text=True,
        timeout=60,
        cwd=REPO,
    )
    assert done.returncode == 2 and f"--videos {tmp_path}: no video files" in done.stderr


def test_speed_model_cpu_prints_a_row_for_the_variant():
    out = _run(
        "speed_model.py",
        "--variants", "xs",
        "--batch-size", "1",
        "--threads", "1",
        "--iters", "1",
        "--warmup", "0",
        timeout=240,
    )  # fmt: skip
    row = re.search(
        r"^\| morphmlp_xs \| 8×112² \| 1 \| fp32 \| ([\d.]+) \| (\d+) \| ([\d.]+) \|", out, re.M
    )
    assert row and float(row[1]) > 0 and float(row[3]) > 0, out
