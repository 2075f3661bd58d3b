"""data.num_samples (repeated augmentation) and data.augment_on: bad values rejected by name, at
construction and by the training job before anything starts (the pipeline side is in
tests/test_data_pipeline.py, the worker side in tests/test_data_worker_augment.py)."""

import subprocess
import sys
from pathlib import Path

import pytest
from support import error_lines

from morphmlp.config import from_dict
from morphmlp.data.config import DataConfig
from morphmlp.errors import ConfigError

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.parametrize("value", [0, -2, 1.5, True, "2"])
def test_num_samples_below_one_or_not_an_integer_is_a_config_error(value):
    with pytest.raises(ConfigError, match=r"^data\.num_samples=.* must be an integer >= 1"):
        DataConfig(num_samples=value)


def test_augment_on_is_actor_or_worker():
    assert DataConfig().augment_on == "actor"  # the release-faithful Pillow path by default
    assert from_dict(DataConfig, {"num_samples": 2, "augment_on": "worker"}).num_samples == 2
    with pytest.raises(ConfigError, match=r"^data\.augment_on='gpu' must be 'actor'"):
        DataConfig(augment_on="gpu")


def test_the_training_job_rejects_num_samples_zero_with_one_line_and_exit_2():
    out = subprocess.run(
        [sys.executable, "jobs/train.py", "--print-config", "--set", "data.num_samples=0"],
        cwd=ROOT,
        capture_output=True,
        text=True,
    )
    assert out.returncode == 2 and out.stdout == ""
    errors = error_lines(out.stderr)
    assert errors == [
        "error: data.num_samples=0 must be an integer >= 1 (clips per decoded training video)"
    ]
