"""The benchmark scripts in jobs/ run end to end at tiny sizes and print their figures. They are
not timed here: the figures in docs/benchmarks.md come from full runs."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

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


def test_benchmark_data_pipeline_prints_both_core_counts_and_memory(tmp_path):
    out = _run(
        "benchmark_data.py",
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


def test_benchmark_model_cpu_prints_a_row_for_the_variant():
    out = _run(
        "benchmark_model.py",
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
