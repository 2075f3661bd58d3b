"""Training: configuration resolution, checkpoint files, bad input refused before any worker
starts, and fault tolerance for real (a SIGKILLed worker, a killed driver) with checkpoints in an
S3 bucket served by moto on 127.0.0.1."""

from __future__ import annotations

import contextlib
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import psutil
import pytest
import torch

from morphmlp.errors import ConfigError, StorageError
from morphmlp.train.checkpoint import (
    Progress,
    export_model,
    read_checkpoint_dir,
    read_progress,
    write_checkpoint_dir,
)
from morphmlp.train.config import resolve_config, steps_per_epoch

REPO = Path(__file__).resolve().parents[1]
TRAIN = [sys.executable, str(REPO / "jobs" / "train.py")]


def test_recipe_then_user_tree_and_one_source_for_frames():
    cfg = resolve_config({"optim": {"epochs": 3}, "model": {"variant": "xs"}})
    assert cfg.optim.epochs == 3  # the user's value over the recipe's
    assert cfg.optim.lr_reference_batch == 16  # from recipes/xs.yaml
    assert (cfg.data.num_frames, cfg.data.train_crop_size) == (8, 112)  # from the variant
    b = resolve_config({"model": {"variant": "b", "num_frames": 32}})
    assert b.data.num_frames == 32 and b.data.test_crop_size == 224
    assert b.optim.lr == pytest.approx(2e-4) and b.optim.warmup_epochs == 10  # the release's
    with pytest.raises(ConfigError, match=r"data.num_frames=16 conflicts with the model's 8"):
        resolve_config({"model": {"variant": "xs"}, "data": {"num_frames": 16}})
    with pytest.raises(ConfigError, match="unknown MorphMLP variant 'q'; choose one of"):
        resolve_config({"model": {"variant": "q"}})


def test_global_batch_scales_lr_and_sets_steps_per_epoch():
    cfg = resolve_config({"optim": {"batch_size": 4, "grad_accum_steps": 2}})
    cfg.scaling.workers = 3
    assert cfg.global_batch == 24
    assert cfg.scaled_lr == pytest.approx(cfg.optim.lr * 24 / cfg.optim.lr_reference_batch)
    assert steps_per_epoch(50, cfg) == 2  # the remainder is dropped
    with pytest.raises(ConfigError, match="fewer than one global batch of 24"):
        steps_per_epoch(20, cfg)


def test_checkpoint_roundtrip_and_export_loads_strictly(tmp_path):
    from morphmlp.models import create_model, load_checkpoint

    model = create_model("xs", num_classes=6)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    model(torch.randn(2, 3, 8, 112, 112)).sum().backward()
    opt.step()
    progress = Progress(step=7, epoch=1, position=56, best_top1=0.5, best_epoch=1)
    write_checkpoint_dir(
        str(tmp_path), model=model, optimizer=opt, scaler=None, progress=progress, config={"a": 1}
    )
    state = read_checkpoint_dir(str(tmp_path))
    assert read_progress(str(tmp_path)) == progress
    assert state["config"] == {"a": 1} and state["optimizer"]["state"]
    assert not list(tmp_path.glob("*.tmp-*"))  # atomic writes leave no temporaries

    export_model(
        str(tmp_path / "model.pt"),
        model=model,
        model_config={"x": 1},
        class_names=list("abcdef"),
        data_config={},
        metrics={"val/top1": 0.5},
    )
    fresh = create_model("xs", num_classes=6)
    report = load_checkpoint(fresh, str(tmp_path / "model.pt"))
    assert not report.head_reset
    for key, value in model.state_dict().items():
        assert torch.equal(fresh.state_dict()[key], value), key


def _run_train(*args: str, env: dict | None = None, timeout: int = 120):
    return subprocess.run(
        [*TRAIN, *args],
        capture_output=True,
        text=True,
        timeout=timeout,
        env={**os.environ, **(env or {})},
        cwd=REPO,
    )


@pytest.mark.parametrize(
    ("args", "env", "message"),
    [
        (["--variant", "nope"], {}, "unknown MorphMLP variant 'nope'; choose one of"),
        (["--img-size", "100"], {}, "stage 1: chunk length 14"),
        (["--dataset", "/no/such/index.parquet"], {}, "/no/such/index.parquet"),
        (["--set", "optim.epochs=zero"], {}, "optim.epochs: expected an integer, got 'zero'"),
        (["--set", "optim.lr=-1"], {}, "optim.lr=-1.0 must be > 0"),
        (["--storage", "/proc/no-write"], {}, "/proc/no-write"),
        ([], {"MLFLOW_TRACKING_URI": "http://127.0.0.1:9"}, "MLflow server http://127.0.0.1:9"),
        (["--address", "127.0.0.1:9"], {}, "can't connect to the Ray cluster at 127.0.0.1:9"),
    ],
)
def test_bad_input_fails_with_one_line_before_any_worker(
    args, env, message, tiny_demo_index, tmp_path
):
    base = ["--dataset", tiny_demo_index, "--storage", str(tmp_path / "runs")]
    store = {"MLFLOW_TRACKING_URI": f"sqlite:///{tmp_path}/mlflow.db"}
    result = _run_train(*base, *args, env={**store, **env})
    assert result.returncode == 2, result.stdout + result.stderr
    errors = [line for line in result.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and message in errors[0], result.stderr
    assert "RayTrainWorker" not in result.stdout + result.stderr


def _committed_step(run_dir: str) -> int:
    """The step of the latest checkpoint Ray Train has committed (0: none yet). Ray rewrites its
    snapshot while we poll, so a read may catch it half-written: that counts as not yet."""
    from ray.train.v2._internal.exceptions import CheckpointManagerInitializationError

    from morphmlp.train.trainer import latest_progress

    try:
        progress = latest_progress(run_dir)
    except (CheckpointManagerInitializationError, StorageError):
        return 0
    return progress.step if progress else 0


def _checkpoint_steps(bucket: str, prefix: str) -> list[int]:
    import boto3

    pages = (
        boto3.client("s3").get_paginator("list_objects_v2").paginate(Bucket=bucket, Prefix=prefix)
    )
    keys = [obj["Key"] for page in pages for obj in page.get("Contents", [])]
    return sorted(
        int(m.group(1)) for k in keys if (m := re.search(r"checkpoint_step(\d+)/progress.json", k))
    )


def _wait(predicate, timeout: float, what: str, proc: subprocess.Popen):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return
        if proc.poll() is not None:
            raise AssertionError(f"training exited ({proc.returncode}) before {what}")
        time.sleep(0.5)
    raise AssertionError(f"timed out waiting for {what}")


@pytest.mark.slow
@pytest.mark.timeout(600)
def test_worker_and_driver_failures_resume_from_s3_checkpoints(
    tiny_demo_index, s3_bucket, tmp_path
):
    import mlflow

    from morphmlp.train.trainer import latest_progress

    bucket = s3_bucket.removeprefix("s3://")
    storage = f"{s3_bucket}/runs"
    name = "ft"
    epochs, batch = 3, 4  # 24 training videos: 6 steps an epoch, 18 in all
    env = {"MLFLOW_TRACKING_URI": f"sqlite:///{tmp_path}/mlflow.db"}
    cmd = [
        *TRAIN,
        "--dataset",
        tiny_demo_index,
        "--storage",
        storage,
        "--name",
        name,
        "--epochs",
        str(epochs),
        "--batch-size",
        str(batch),
        "--cpus-per-worker",
        "0.5",
        "--set",
        "run.checkpoint_every_steps=2",
        "--set",
        "run.log_every_steps=1",
        "--set",
        "optim.warmup_epochs=1",
    ]
    log1 = open(tmp_path / "run1.log", "w")  # noqa: SIM115 - read after the process ends
    first = subprocess.Popen(
        cmd,
        cwd=REPO,
        env={**os.environ, **env},
        stdout=log1,
        stderr=subprocess.STDOUT,
        start_new_session=True,
    )
    try:
        # Kill once Ray Train has committed a checkpoint (its snapshot names it): files in the
        # bucket that the controller hasn't registered yet are not a resume point.
        _wait(lambda: _committed_step(f"{storage}/{name}") >= 2, 240, "a checkpoint", first)
        workers = [
            p
            for p in psutil.Process(first.pid).children(recursive=True)
            if "RayTrainWorker" in " ".join(p.cmdline())
        ]
        assert len(workers) == 1
        committed = latest_progress(f"{storage}/{name}").step
        workers[0].send_signal(signal.SIGKILL)
        # Ray restarts the worker group; it must carry on past the first epoch from S3.
        _wait(
            lambda: _committed_step(f"{storage}/{name}") >= 8,
            240,
            "a checkpoint after the restart",
            first,
        )
        # The driver and its whole local Ray die at once: Ray's processes need not share the
        # driver's process group, so kill every descendant and wait. A surviving worker or
        # controller would commit one more checkpoint after we read where the run stopped.
        ray_procs = psutil.Process(first.pid).children(recursive=True)
        os.killpg(first.pid, signal.SIGKILL)
        for p in ray_procs:
            with contextlib.suppress(psutil.NoSuchProcess):
                p.kill()
        psutil.wait_procs(ray_procs, timeout=30)
        first.wait(30)
    finally:
        if first.poll() is None:
            os.killpg(first.pid, signal.SIGKILL)
        log1.close()
    output1 = (tmp_path / "run1.log").read_text()
    resumed = re.search(r"resumed at epoch (\d+), step (\d+)", output1)
    assert resumed, output1[-3000:]
    assert int(resumed.group(2)) >= committed >= 2  # nothing before the committed step again
    stopped_at = latest_progress(f"{storage}/{name}")
    assert stopped_at is not None and 8 <= stopped_at.step < epochs * 6

    second = subprocess.run(
        cmd, cwd=REPO, env={**os.environ, **env}, capture_output=True, text=True, timeout=400
    )
    assert second.returncode == 0, second.stdout[-3000:] + second.stderr[-3000:]
    resumed_from = re.search(
        rf"Resuming run {name} from step (\d+)/18", second.stdout + second.stderr
    )
    assert resumed_from, second.stdout[-3000:] + second.stderr[-3000:]
    assert int(resumed_from.group(1)) == stopped_at.step, resumed_from.group(0)
    done = latest_progress(f"{storage}/{name}")
    assert (done.step, done.epoch, done.position) == (18, 3, 18 * batch)

    # One MLflow run across both drivers: every step logged, every epoch validated once or more.
    client = mlflow.MlflowClient(env["MLFLOW_TRACKING_URI"])
    (run,) = client.search_runs(
        [client.get_experiment_by_name("morphmlp-demo").experiment_id],
        filter_string=f"tags.run_dir = '{storage}/{name}'",
    )
    steps = {m.step for m in client.get_metric_history(run.info.run_id, "train/loss")}
    assert steps == set(range(1, 19))  # continuous: nothing skipped across the restarts
    epochs_seen = {int(m.value) for m in client.get_metric_history(run.info.run_id, "epoch")}
    assert epochs_seen == {1, 2, 3}
    assert run.data.params["dataset_hash"]
    versions = client.search_model_versions(f"run_id='{run.info.run_id}'")
    assert {v.tags["kind"] for v in versions} == {"best", "final"}
    assert all(v.tags["variant"] == "xs" for v in versions)
    keys = _checkpoint_steps(bucket, f"runs/{name}/")
    assert keys and max(keys) == 18
    import boto3

    listing = boto3.client("s3").list_objects_v2(Bucket=bucket, Prefix=f"runs/{name}/final/")
    assert [o["Key"] for o in listing["Contents"]] == [f"runs/{name}/final/model.pt"]


def test_a_cut_off_ray_snapshot_is_reported_by_name(tmp_path):
    from morphmlp.train.trainer import RAY_SNAPSHOT_FILE, latest_progress

    assert latest_progress(str(tmp_path)) is None  # no snapshot: a fresh run
    (tmp_path / RAY_SNAPSHOT_FILE).write_text('{"ray_version": "2.60.0", "checkpoint_res')
    with pytest.raises(
        StorageError, match=re.escape(f"{tmp_path}/{RAY_SNAPSHOT_FILE} can't be read")
    ):
        latest_progress(str(tmp_path))


@pytest.mark.slow
def test_a_broken_snapshot_is_set_aside_and_the_run_continues_from_a_complete_checkpoint(
    tiny_demo_index, tmp_path
):
    """A crash while Ray Train rewrites its snapshot (or, on moto's S3, a killed PUT) leaves a
    file Ray can't start from. Re-running sets it aside and resumes from the newest checkpoint
    folder that is whole, skipping one cut short."""
    from morphmlp.train.trainer import RAY_SNAPSHOT_FILE, latest_progress

    runs = tmp_path / "runs"
    args = [
        *("--dataset", tiny_demo_index, "--storage", str(runs), "--name", "bs"),
        *("--epochs", "2", "--batch-size", "4", "--cpus-per-worker", "0.5"),
        *("--set", "run.checkpoint_every_steps=2"),
    ]
    env = {"MLFLOW_TRACKING_URI": f"sqlite:///{tmp_path}/mlflow.db"}
    first = _run_train(*args, env=env, timeout=300)
    assert first.returncode == 0, first.stderr[-3000:]
    run_dir = runs / "bs"
    assert latest_progress(str(run_dir)).step == 12  # 24 videos / batch 4 = 6 steps an epoch
    snapshot = run_dir / RAY_SNAPSHOT_FILE
    snapshot.write_bytes(snapshot.read_bytes()[:-40])  # cut short
    newest = run_dir / "checkpoint_step00000012" / "checkpoint.pt"
    newest.write_bytes(newest.read_bytes()[:1000])  # cut short too: not a resume point

    second = _run_train(*args, env=env, timeout=300)
    assert second.returncode == 0, second.stderr[-3000:]
    output = second.stdout + second.stderr
    assert f"{snapshot} can't be read" in output and "set aside as" in output, output[-3000:]
    assert "newest complete checkpoint, checkpoint_step00000010" in output, output[-3000:]
    assert re.search(r"resumed at epoch 1, step 10\b", output), output[-3000:]
    assert [p.name.split(".broken-")[0] for p in run_dir.glob("*.broken-*")] == [RAY_SNAPSHOT_FILE]
    assert latest_progress(str(run_dir)).step == 12  # trained steps 11-12 again, and finished
