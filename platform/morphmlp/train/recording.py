"""Recording a training run in MLflow: the run (created, or reopened by a resumed attempt) with
the resolved config as params, then after fit the bad-data report, the curves, the model files
and their registered versions. Everything here runs on the driver.
"""

from __future__ import annotations

import json
import logging
import os
import tempfile
from typing import TYPE_CHECKING

import yaml

from morphmlp import storage, tracking
from morphmlp.config import flatten

if TYPE_CHECKING:
    from morphmlp.train.driver import TrainOutcome, TrainPlan

log = logging.getLogger("morphmlp.train")

# In the run folder: the MLflow run id, so that every attempt of a run records into one run.
MLFLOW_RUN_FILE = "mlflow_run.json"


def mlflow_run(plan: TrainPlan, parent_run_id: str | None = None) -> str:
    """Create the MLflow run, or reopen the one an earlier attempt of this run created."""
    cfg = plan.cfg
    marker = storage.join(plan.run_dir, MLFLOW_RUN_FILE)
    existing = json.loads(storage.read_bytes(marker)) if storage.exists(marker) else None
    tags = {
        "variant": cfg.model.variant,
        "frames": str(cfg.model.num_frames),
        "img_size": str(cfg.model.img_size),
        "dataset": cfg.dataset,
        "git_commit": tracking.git_commit(),
        "run_dir": storage.redact(plan.run_dir),
    }
    if parent_run_id:
        tags["mlflow.parentRunId"] = parent_run_id
    run_id = tracking.start_run(
        cfg.run.experiment,
        plan.run_name,
        tags=tags,
        run_id=existing["run_id"] if existing else None,
    )
    if existing is None:
        tree = plan.recorded_config()
        marker_state = {"run_id": run_id, "schedule": schedule_identity(plan)}
        storage.write_bytes_atomic(marker, json.dumps(marker_state).encode())
        tracker = tracking.Tracker(run_id)
        params = {
            **flatten(tree),
            "dataset_uri": storage.redact(plan.index_uri),
            "dataset_hash": plan.train_index.content_hash(),
            "num_train_videos": len(plan.train_index),
            "num_val_videos": len(plan.val_index),
            "num_classes": len(plan.train_index.class_names),
            "steps_per_epoch": plan.steps_per_epoch,
            "global_batch": cfg.global_batch,
            "scaled_lr": cfg.scaled_lr,
            "world_size": cfg.scaling.workers,
            "git_commit": tags["git_commit"],
            **tracking.package_versions(),
        }
        tracker.log_params(params)
        tracker.log_dataset(
            name=os.path.basename(plan.index_uri.rstrip("/")) or "index",
            source=storage.redact(plan.index_uri),
            digest=params["dataset_hash"],
            context="training",
        )
        tracker.log_text(yaml.safe_dump(tree, sort_keys=False), "config.yaml")
        tracker.flush()
    return run_id


def schedule_identity(plan: TrainPlan) -> dict:
    """What a sample position means for this run: a re-run with other values can't continue it
    exactly (the driver refuses one)."""
    return {
        "dataset_hash": plan.train_index.content_hash(),
        "epoch_size": len(plan.train_index),
        "seed": plan.cfg.run.seed,
    }


def recorded_schedule(run_dir: str) -> dict | None:
    marker = storage.join(run_dir, MLFLOW_RUN_FILE)
    if not storage.exists(marker):
        return None
    return json.loads(storage.read_bytes(marker)).get("schedule")


def end_run(run_id: str | None, status: str) -> None:
    """FAILED or KILLED when fit did not end well (a re-run sets it RUNNING again)."""
    tracking.Tracker(run_id).end(status)


def record_resume(run_id: str | None, plan: TrainPlan) -> None:
    """A resumed attempt: the world size and global batch now in force, as tags (params are
    the first attempt's and can't change); per-step values go to train/world_size etc."""
    tracker = tracking.Tracker(run_id)
    tracker.set_tags(
        {
            "world_size": str(plan.cfg.scaling.workers),
            "global_batch": str(plan.cfg.global_batch),
            "resumed_at_position": str(plan.progress.position if plan.progress else 0),
        }
    )
    tracker.flush()


def record(plan: TrainPlan, outcome: TrainOutcome, ledgers: dict) -> None:
    """After fit: bad-data report, curves, model files, registered versions and aliases."""
    from morphmlp.data.errors import BadDataError

    tracker = tracking.Tracker(outcome.mlflow_run_id)
    cfg = plan.cfg
    with tempfile.TemporaryDirectory() as tmp:
        for split, ledger in ledgers.items():
            if not ledger.summary()["bad"]:
                continue
            report = storage.join(plan.run_dir, f"bad_data_{split}.csv")
            ledger.write_report(report)
            outcome.bad_data_report = outcome.bad_data_report or report
            local = os.path.join(tmp, f"bad_data_{split}.csv")
            with open(local, "wb") as f:
                f.write(storage.read_bytes(report))
            tracker.log_artifact(local)
        for split, ledger in ledgers.items():
            try:
                ledger.check(
                    cfg.data.max_bad_fraction,
                    what=f"{split} videos",
                    report=storage.join(plan.run_dir, f"bad_data_{split}.csv"),
                )
            except BadDataError:
                tracker.end("FAILED")
                raise
        log_curves(tracker, tmp)
        for kind in ("best", "final"):
            uri = storage.join(plan.run_dir, kind, "model.pt")
            if not storage.exists(uri):
                continue
            local_dir = os.path.join(tmp, kind)
            os.makedirs(local_dir)
            with open(os.path.join(local_dir, "model.pt"), "wb") as f:
                f.write(storage.read_bytes(uri))
            tracker.log_artifact(os.path.join(local_dir, "model.pt"), f"checkpoints/{kind}")
            if cfg.run.register_model and outcome.mlflow_run_id:
                try:
                    outcome.model_versions[kind] = tracking.register_model_version(
                        outcome.mlflow_run_id,
                        f"checkpoints/{kind}",
                        tags={
                            "variant": cfg.model.variant,
                            "frames": str(cfg.model.num_frames),
                            "img_size": str(cfg.model.img_size),
                            "dataset": cfg.dataset,
                            "run": plan.run_name,
                            "kind": kind,
                            "val_top1": f"{outcome.progress.best_top1:.4f}",
                        },
                    )
                except Exception as err:  # registry outage: the files are safe in run_dir
                    log.warning("could not register %s model in MLflow: %s", kind, err)
    if outcome.model_versions:
        try:
            tracking.update_training_aliases(outcome.model_versions)
        except Exception as err:  # as above
            log.warning("could not move the registry aliases in MLflow: %s", err)
    tracker.log_metrics(
        {"best_val_top1": outcome.progress.best_top1, "best_epoch": outcome.progress.best_epoch},
        outcome.progress.step,
    )
    tracker.end("FINISHED")


def log_curves(tracker: tracking.Tracker, tmp: str) -> None:
    """Loss and validation accuracy over steps, as one PNG artifact."""
    if not tracker.enabled:
        return
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    try:
        history = {
            key: tracker.client.get_metric_history(tracker.run_id, key)
            for key in ("train/loss", "val/top1", "val/loss")
        }
    except Exception as err:
        log.warning("could not read metric history for curves: %s", err)
        return
    fig, axes = plt.subplots(1, 2, figsize=(10, 4))
    for key, ax in (("train/loss", axes[0]), ("val/loss", axes[0]), ("val/top1", axes[1])):
        points = sorted((m.step, m.value) for m in history[key])
        if points:
            ax.plot(*zip(*points, strict=True), label=key)
    for ax in axes:
        ax.set_xlabel("step")
        ax.legend()
    fig.tight_layout()
    path = os.path.join(tmp, "curves.png")
    fig.savefig(path, dpi=100)
    plt.close(fig)
    tracker.log_artifact(path)
