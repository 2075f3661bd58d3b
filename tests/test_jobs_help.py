"""Every job's --help: it runs without Ray or MLflow, and each example command is one line that
can be copied as it is (no backslash continuations that `--help` would run together)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
JOBS = sorted(p.name for p in (REPO / "jobs").glob("*.py"))


@pytest.mark.parametrize("job", JOBS)
def test_help_prints_one_example_command_per_line(job):
    result = subprocess.run(
        [sys.executable, str(REPO / "jobs" / job), "--help"],
        capture_output=True,
        text=True,
        timeout=120,
        cwd=REPO,
    )
    assert result.returncode == 0, result.stderr[-2000:]
    lines = result.stdout.splitlines()
    assert not [line for line in lines if line.rstrip().endswith("\\")], result.stdout
    examples = [line for line in lines if f"jobs/{job}" in line]
    assert examples, f"no example command in {job} --help"
    for line in examples:
        assert line.lstrip().startswith(("python ", "ray job submit", "RAY_")), line
