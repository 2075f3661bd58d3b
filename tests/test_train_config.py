"""One typed config path: what a user types on jobs/train.py and jobs/tune.py is what the config
holds (flags set typed values; YAML is parsed only in --config files and --set values), the
recipe is a named layer, and --print-config prints the resolved YAML without Ray or MLflow."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from support import load_job

from morphmlp.config import from_dict
from morphmlp.train.config import RECIPES_DIR, TrainJobConfig, resolve_config

REPO = Path(__file__).resolve().parents[1]

# Each of these was refused with a type error or silently changed when flags went through YAML.
TYPED_VALUES = [
    ("--name", "2025-06-01"),  # a YAML date
    ("--name", "007"),  # a YAML integer (7)
    ("--name", "yes"),  # a YAML 1.1 boolean
    ("--name", "exp #2"),  # a YAML comment: "exp"
    ("--name", "null"),  # YAML null: the default run, resumed
    ("--storage", "/tmp/a #b"),  # "/tmp/a"
]
KEYS = {"--name": ("run", "name"), "--storage": ("run", "storage")}


@pytest.mark.parametrize(("flag", "value"), TYPED_VALUES)
def test_train_flags_mean_what_the_user_typed(flag, value):
    train = load_job("train")
    cfg = resolve_config(train.config_tree(train.parse_args([flag, value])))
    section, key = KEYS[flag]
    assert getattr(getattr(cfg, section), key) == value


@pytest.mark.parametrize(("flag", "value"), TYPED_VALUES)
def test_print_config_of_both_jobs_holds_what_the_user_typed(flag, value, capsys):
    section, key = KEYS[flag]
    assert load_job("train").main(["--print-config", flag, value]) == 0
    printed = yaml.safe_load(capsys.readouterr().out)
    assert printed[section][key] == value
    assert from_dict(TrainJobConfig, printed) == resolve_config({section: {key: value}})

    assert load_job("tune").main(["--print-config", flag, value]) == 0
    printed = yaml.safe_load(capsys.readouterr().out)
    if flag == "--name":  # the search's name; the trials' runs are named by the search
        assert printed["search"]["name"] == value
    else:
        assert printed["train"][section][key] == value


def test_set_values_and_config_files_are_still_yaml(tmp_path):
    train = load_job("train")
    user = tmp_path / "user.yaml"
    user.write_text("optim:\n  epochs: 4\nrun:\n  name: from-file\n")
    args = ["--config", str(user), "--set", "optim.lr=2.0e-3", "--set", "run.keep_last=5"]
    cfg = resolve_config(train.config_tree(train.parse_args([*args, "--epochs", "3"])))
    assert (cfg.optim.epochs, cfg.optim.lr, cfg.run.keep_last) == (3, 2e-3, 5)  # flag over file
    assert cfg.run.name == "from-file"
    # --set is applied last, and parsed: a null there is null
    cfg = resolve_config(
        train.config_tree(train.parse_args(["--name", "x", "--set", "run.name=null"]))
    )
    assert cfg.run.name is None


@pytest.mark.parametrize("job", ["train", "tune"])
def test_print_config_exits_0_naming_the_recipe_without_ray_or_mlflow(job, tmp_path):
    # Unreachable Ray and MLflow: any attempt to use either would fail the job.
    env = {
        **os.environ,
        "RAY_ADDRESS": "127.0.0.1:9",
        "MLFLOW_TRACKING_URI": "http://127.0.0.1:9",
    }
    result = subprocess.run(
        [sys.executable, str(REPO / "jobs" / f"{job}.py"), "--print-config", "--epochs", "3"],
        capture_output=True,
        text=True,
        timeout=300,
        env=env,
        cwd=tmp_path,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    printed = yaml.safe_load(result.stdout)
    train = printed if job == "train" else printed["train"]
    assert train["optim"]["epochs"] == 3
    assert train["optim"]["lr_reference_batch"] == 8  # from the recipe (the default is 64)
    recipe = [line for line in result.stderr.splitlines() if "Recipe applied:" in line]
    assert len(recipe) == 1 and os.path.join(RECIPES_DIR, "xs.yaml") in recipe[0], result.stderr
    assert not (tmp_path / "runs").exists()  # nothing prepared


def test_bad_flag_values_still_fail_by_name(capsys):
    assert load_job("train").main(["--print-config", "--set", "optim.epochs=zero"]) == 2
    assert "optim.epochs: expected an integer, got 'zero'" in capsys.readouterr().err
