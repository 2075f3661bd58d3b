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
from support import error_lines

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
    assert cfg.optim.lr_reference_batch == 8  # from recipes/xs.yaml
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


def test_one_factory_for_variant_names_search_files_and_pretrained_inflation(tmp_path):
    """Training's model door: a variant YAML written by the search, overridden like a name; an
    image checkpoint as `pretrained` is inflated (center), as the workers do it."""
    from morphmlp.models import build_model, save_variant_file, variant_config
    from morphmlp.models.factory import create_model, model_config
    from morphmlp.train.config import ModelConfig

    searched = variant_config("xs", depths=(1, 1, 1, 1), num_classes=6)
    save_variant_file(searched, str(tmp_path / "variant.yaml"))
    assert model_config(str(tmp_path / "variant.yaml")) == searched
    section = ModelConfig(variant=str(tmp_path / "variant.yaml"), num_frames=16)
    model = create_model(section.variant, num_classes=3, **section.factory_kwargs())
    assert (model.cfg.depths, model.cfg.num_frames, model.cfg.num_classes) == ((1, 1, 1, 1), 16, 3)
    with pytest.raises(ConfigError, match=r"variant\.yaml: num_frames: expected an integer"):
        model_config(str(tmp_path / "variant.yaml"), num_frames="many")

    image = build_model(variant_config("xs_image", num_classes=6))
    torch.save(image.state_dict(), tmp_path / "image.pt")
    video = create_model("xs", num_classes=6, pretrained=str(tmp_path / "image.pt"))
    kernel_2d = image.state_dict()["patch_embed1.proj1.weight"]
    kernel_3d = video.state_dict()["patch_embed1.proj1.weight"]
    torch.testing.assert_close(kernel_3d[:, :, kernel_3d.shape[2] // 2], kernel_2d)
    assert not kernel_3d[:, :, 0].any()  # "center": the other frames start at zero


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
        (["--frames", "1"], {}, "model: 1 frames at 112x112 (--frames, --img-size) don't run"),
        # requests the local cluster (this machine's CPUs, no GPU, no autoscaler) can never meet
        (["--gpus-per-worker", "1"], {}, "need 1 CPU, 1 GPU each"),
        (["--workers", "24", "--batch-size", "1"], {}, "24 training worker(s) need"),
    ],
)
def test_bad_input_fails_with_one_line_before_any_worker(
    args, env, message, tiny_demo_index, tmp_path
):
    base = ["--dataset", tiny_demo_index, "--storage", str(tmp_path / "runs")]
    store = {"MLFLOW_TRACKING_URI": f"sqlite:///{tmp_path}/mlflow.db"}
    result = _run_train(*base, *args, env={**store, **env})
    assert result.returncode == 2, result.stdout + result.stderr
    errors = error_lines(result.stderr)
    assert len(errors) == 1 and message in errors[0], result.stderr
    assert "RayTrainWorker" not in result.stdout + result.stderr


def _committed_step(run_dir: str) -> int:
    """The step of the latest checkpoint Ray Train has committed (0: none yet). Ray rewrites its
    snapshot while we poll, so a read may catch it half-written: that counts as not yet."""
    from ray.train.v2._internal.exceptions import CheckpointManagerInitializationError

    from morphmlp.train.resume import latest_progress

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

    from morphmlp.train.resume import latest_progress

    bucket = s3_bucket.removeprefix("s3://")
    storage = f"{s3_bucket}/runs"
    name = "ft"
    # 2 workers x batch 2: a global batch of 4 and 24 training videos, so 6 steps an epoch, 18
    # in all
    epochs, batch, ranks = 3, 2, 2
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
        "--workers",
        str(ranks),
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
        assert len(workers) == 2
        committed = latest_progress(f"{storage}/{name}").step
        workers[1].send_signal(signal.SIGKILL)  # one of the two ranks dies mid-epoch
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
    assert (done.step, done.epoch, done.position) == (18, 3, 18 * batch * ranks)

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
    assert keys == [16, 18]  # run.keep_last (2) checkpoints; the best model is kept apart:
    import boto3

    for kind in ("best", "final"):
        listing = boto3.client("s3").list_objects_v2(Bucket=bucket, Prefix=f"runs/{name}/{kind}/")
        assert [o["Key"] for o in listing["Contents"]] == [f"runs/{name}/{kind}/model.pt"]


def test_a_cut_off_ray_snapshot_is_reported_by_name(tmp_path):
    from morphmlp.train.resume import RAY_SNAPSHOT_FILE, latest_progress

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
    from morphmlp.train.resume import RAY_SNAPSHOT_FILE, latest_progress

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


def _with_a_missing_training_video(index_uri: str, folder: Path) -> str:
    import pyarrow as pa

    from morphmlp.data.index import VideoIndex, read_index, write_index

    index = read_index(index_uri)
    uris = index.table["uri"].to_pylist()
    first_train = index.table["split"].to_pylist().index("train")
    uris[first_train] = str(folder / "gone.mp4")
    table = index.table.set_column(index.table.column_names.index("uri"), "uri", pa.array(uris))
    out = str(folder / "index.parquet")
    write_index(VideoIndex(table, index.class_names), None, out)
    return out


@pytest.mark.slow
@pytest.mark.timeout(900)
def test_a_run_resumed_on_another_world_size_continues_at_its_sample_and_runs_every_epoch(
    tiny_demo_index, tmp_path
):
    """1 worker for an epoch, then 2 workers (global batch 4 -> 8) to epoch 2, then 1 again to
    epoch 3: every epoch is validated once, the run ends at the right sample, the bad-data
    ledger counts its one missing video once across the attempts, and re-running the finished
    run writes nothing."""
    import json

    import mlflow

    from morphmlp.train.resume import latest_progress

    index = _with_a_missing_training_video(tiny_demo_index, tmp_path)
    runs, name = tmp_path / "runs", "ws"
    env = {"MLFLOW_TRACKING_URI": f"sqlite:///{tmp_path}/mlflow.db"}
    base = [
        *("--dataset", index, "--storage", str(runs), "--name", name, "--batch-size", "4"),
        *("--cpus-per-worker", "0.5", "--set", "data.max_bad_fraction=0.1"),
        *("--set", "run.log_every_steps=1"),
    ]

    def train(*args: str):
        result = _run_train(*base, *args, env=env, timeout=400)
        assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
        return result.stdout + result.stderr

    train("--epochs", "1", "--workers", "1")  # 24 videos / 4: 6 steps
    assert latest_progress(str(runs / name)).position == 24
    out = train("--epochs", "2", "--workers", "2")  # global batch 8: 3 more steps
    assert "Resuming run ws from step 6/9 (epoch 1, sample 24/48)" in out, out[-3000:]
    assert "The global batch is now 8 (was 4)" in out
    out = train("--epochs", "3", "--workers", "1")
    assert "from step 9/15 (epoch 2, sample 48/72)" in out, out[-3000:]
    done = latest_progress(str(runs / name))
    assert (done.step, done.epoch, done.position, done.global_batch) == (15, 3, 72, 4)

    client = mlflow.MlflowClient(env["MLFLOW_TRACKING_URI"])
    (run,) = client.search_runs([client.get_experiment_by_name("morphmlp-demo").experiment_id])
    run_id = run.info.run_id
    epochs = sorted(int(m.value) for m in client.get_metric_history(run_id, "epoch"))
    assert epochs == [1, 2, 3]  # each epoch validated once, none skipped
    world = {m.step: m.value for m in client.get_metric_history(run_id, "train/world_size")}
    assert world[6] == 1 and world[9] == 2 and world[15] == 1
    assert run.data.tags["world_size"] == "1" and run.data.tags["global_batch"] == "4"
    # The learning rate is a function of the sample position, for the global batch in force
    # (linear scaling) and the epochs the attempt runs: the step at position p used lr_at(p).
    from morphmlp.train import optim

    lr = {m.step: m.value for m in client.get_metric_history(run_id, "train/lr")}
    recipe = resolve_config({"model": {"variant": "xs"}}).optim  # the xs recipe's lr and batch
    attempts = [(range(1, 7), 1, 4), (range(7, 10), 2, 8), (range(10, 16), 3, 4)]
    position = 0
    for steps, epochs, gb in attempts:
        for step in steps:
            want = optim.lr_at(
                position,
                base_lr=recipe.lr * gb / recipe.lr_reference_batch,
                total_steps=epochs * 24,
                warmup_steps=24,
                warmup_start_lr=1e-6,
                min_lr=1e-6,
            )
            assert lr[step] == pytest.approx(want, rel=1e-6), (step, position)
            position += gb
    bad = [m.value for m in client.get_metric_history(run_id, "data/train_bad_videos")]
    assert bad == [1.0, 1.0, 1.0]  # counted once, across the attempts
    states = json.loads((runs / name / "bad_data.json").read_text())
    assert [r["uri"] for r in states["train"]["bad"]] == [str(tmp_path / "gone.mp4")]

    # Finished: a re-run says so and writes nothing (no metric, no version, no artifact).
    versions = client.search_model_versions(f"run_id='{run_id}'")
    before = client.get_run(run_id).data.metrics
    out = train("--epochs", "3", "--workers", "1")
    assert "Run ws is finished (3 epochs" in out and "Resuming" not in out
    assert client.get_run(run_id).data.metrics == before
    assert len(client.search_model_versions(f"run_id='{run_id}'")) == len(versions)
    aliases = client.get_registered_model("morphmlp").aliases
    assert set(aliases) >= {"best", "newest"}
    assert str(aliases["newest"]) in {str(v.version) for v in versions if v.tags["kind"] == "final"}


def test_a_run_stopped_for_bad_data_is_not_continued_unless_the_threshold_is_raised(
    tiny_demo_index, tmp_path, caplog
):
    """What the ledgers found lives in the run folder: a re-run reads it before any work."""
    import json

    from morphmlp.data.errors import BadDataError
    from morphmlp.train.driver import prepare

    runs = tmp_path / "runs"
    (runs / "bd").mkdir(parents=True)
    bad = [
        {"uri": f"s3://b/v{i}.mp4", "row": i, "reason": "missing", "error_type": "x", "detail": ""}
        for i in range(5)
    ]
    state = {"bad": bad, "seen": [f"s3://b/v{i}.mp4" for i in range(20)]}
    (runs / "bd" / "bad_data.json").write_text(
        json.dumps({"stopped": True, "max_bad_fraction": 0.01, "train": state})
    )
    tree = {"dataset": tiny_demo_index, "run": {"storage": str(runs), "name": "bd"}}
    os.environ.setdefault("MLFLOW_TRACKING_URI", f"sqlite:///{tmp_path}/mlflow.db")
    with pytest.raises(BadDataError) as err:
        prepare(resolve_config(tree))
    message = str(err.value)
    assert "5 of 20 train videos (25.00%)" in message and "data.max_bad_fraction=1.00%" in message
    assert "s3://b/v0.mp4 (missing), s3://b/v1.mp4 (missing), s3://b/v2.mp4 (missing)" in message
    assert f"{runs}/bd/bad_data_train.csv" in message

    tree["data"] = {"max_bad_fraction": 0.3}
    with caplog.at_level("WARNING", logger="morphmlp.train"):
        plan = prepare(resolve_config(tree))
    assert plan.run_name == "bd"
    assert "data.max_bad_fraction is now 30.00%, so it continues" in caplog.text


@pytest.mark.slow
def test_a_run_that_fails_in_its_workers_ends_failed_in_mlflow(tiny_demo_index, tmp_path):
    """The pretrained file exists (the driver checks that) but is no checkpoint: every worker
    fails loading it. The MLflow run must not stay RUNNING."""
    import mlflow

    junk = tmp_path / "junk.pt"
    junk.write_bytes(b"not a checkpoint")
    env = {"MLFLOW_TRACKING_URI": f"sqlite:///{tmp_path}/mlflow.db"}
    result = _run_train(
        *("--dataset", tiny_demo_index, "--storage", str(tmp_path / "runs"), "--name", "bad"),
        *("--pretrained", str(junk), "--epochs", "1", "--cpus-per-worker", "0.5"),
        *("--set", "scaling.max_failures=0"),
        env=env,
        timeout=300,
    )
    assert result.returncode != 0
    client = mlflow.MlflowClient(env["MLFLOW_TRACKING_URI"])
    (run,) = client.search_runs([client.get_experiment_by_name("morphmlp-demo").experiment_id])
    assert run.info.status == "FAILED", result.stderr[-2000:]
