"""Driver side of a training run: check everything, assemble the TorchTrainer, run, record.

Everything that can be wrong with the user's input is checked in `prepare` before Ray starts a
single worker: the architecture (built on the meta device), the index, the storage URI and the
MLflow store.
"""

from __future__ import annotations

import json
import logging
import os
import tempfile
import time
import zipfile
from dataclasses import asdict, dataclass, field, replace
from typing import TYPE_CHECKING, Literal

import pyarrow.fs as pafs

from morphmlp import storage, tracking
from morphmlp.config import ConfigError, flatten, to_dict
from morphmlp.errors import MorphMLPError, StorageError
from morphmlp.train.checkpoint import (
    CHECKPOINT_DIR_PREFIX,
    CHECKPOINT_FILE,
    PROGRESS_FILE,
    Progress,
    read_progress,
)
from morphmlp.train.config import TrainJobConfig, default_run_name, steps_per_epoch
from morphmlp.train.loop import RunInfo, build_model, train_func

if TYPE_CHECKING:
    from morphmlp.data.config import DataConfig as DataSettings

log = logging.getLogger("morphmlp.train")

MLFLOW_RUN_FILE = "mlflow_run.json"
Resume = Literal["auto", "must", "never"]


class ResumeError(MorphMLPError):
    """A run name that clashes with (or is missing from) the storage, given --resume."""


@dataclass
class Prepared:
    cfg: TrainJobConfig
    index_uri: str
    train_index: object  # morphmlp.data.index.VideoIndex
    val_index: object
    run_name: str
    run_dir: str
    steps_per_epoch: int
    progress: Progress | None  # where an earlier attempt of this run stopped
    # Set when Ray Train's snapshot was cut short: the checkpoint folder the run continues from.
    recovered_checkpoint: str | None = None


@dataclass
class TrainOutcome:
    run_name: str
    run_dir: str
    mlflow_run_id: str | None
    progress: Progress
    model_versions: dict[str, str] = field(default_factory=dict)
    bad_data_report: str | None = None

    @property
    def best_model_uri(self) -> str:
        return storage.join(self.run_dir, "best", "model.pt")

    @property
    def final_model_uri(self) -> str:
        return storage.join(self.run_dir, "final", "model.pt")


def prepare(cfg: TrainJobConfig, *, resume: Resume = "auto") -> Prepared:
    """All checks that need no cluster; raises MorphMLPError subclasses with one-line messages."""
    from morphmlp.data.demo import ensure_demo_dataset
    from morphmlp.data.index import read_index

    _check_architecture(cfg)
    index_uri = ensure_demo_dataset() if cfg.dataset == "demo" else cfg.dataset
    index = read_index(index_uri)
    train_index, val_index = index.split("train"), index.split("val")
    spe = steps_per_epoch(len(train_index), cfg)
    dataset_name = "demo" if cfg.dataset == "demo" else _stem(index_uri)
    run_name = cfg.run.name or default_run_name(cfg, dataset_name)
    storage_root = (
        cfg.run.storage if storage.is_uri(cfg.run.storage) else os.path.abspath(cfg.run.storage)
    )
    storage.check_writable(storage_root)
    run_dir = storage.join(storage_root, run_name)
    recovered = recover_from_broken_snapshot(run_dir)
    progress = read_progress(recovered) if recovered else latest_progress(run_dir)
    if progress is not None and resume == "never":
        raise ResumeError(
            f"run {run_name!r} already has checkpoints in {storage.redact(run_dir)}; "
            "choose another --name or use --resume auto"
        )
    if progress is None and resume == "must":
        raise ResumeError(f"no checkpoint to resume in {storage.redact(run_dir)}")
    tracking.check_reachable(tracking.tracking_uri())
    cfg.run.storage = storage_root
    return Prepared(
        cfg, index_uri, train_index, val_index, run_name, run_dir, spe, progress, recovered
    )


def run_training(
    prep: Prepared, *, callbacks: list | None = None, parent_run_id: str | None = None
) -> TrainOutcome:
    """Fit (or resume) the run and record it. `callbacks` go to Ray Train's RunConfig (the
    search passes Tune's report callback); `parent_run_id` nests the MLflow run under a search."""
    import ray.data
    from ray.train import CheckpointConfig, DataConfig, FailureConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchTrainer

    from morphmlp.data.pipeline import BadDataLedger, build_eval_dataset

    cfg = prep.cfg
    ray.data.DataContext.get_current().enable_progress_bars = False
    run_id = _mlflow_run(prep, parent_run_id)
    ledger = BadDataLedger.create(f"morphmlp-bad-data-{prep.run_name}")
    info = RunInfo(
        class_names=list(prep.train_index.class_names),
        steps_per_epoch=prep.steps_per_epoch,
        run_dir=prep.run_dir,
        mlflow_run_id=run_id,
        tracking_uri=tracking.tracking_uri(),
        bad_data_ledger=ledger.name,
        recovered_checkpoint=prep.recovered_checkpoint,
    )
    total_steps = cfg.optim.epochs * prep.steps_per_epoch
    done = prep.progress is not None and prep.progress.step >= total_steps
    if prep.progress is not None:
        log.info(
            "Resuming run %s from step %d/%d (epoch %d); pass --name to start a new run",
            prep.run_name,
            prep.progress.step,
            total_steps,
            prep.progress.epoch,
        )
    if not done:
        trainer = TorchTrainer(
            train_func,
            train_loop_config={"job": to_dict(cfg), "run": asdict(info)},
            scaling_config=ScalingConfig(
                num_workers=cfg.scaling.workers,
                use_gpu=cfg.scaling.gpus_per_worker > 0,
                resources_per_worker=_worker_resources(cfg),
            ),
            run_config=RunConfig(
                name=prep.run_name,
                storage_path=cfg.run.storage,
                failure_config=FailureConfig(max_failures=cfg.scaling.max_failures),
                checkpoint_config=CheckpointConfig(num_to_keep=cfg.run.keep_last),
                callbacks=callbacks,
            ),
            # positions must reach the workers in order ("samples consumed" is then a position);
            # Train replaces each dataset's own execution options with these
            dataset_config=DataConfig(execution_options={"train": _train_ingest(cfg.data)}),
            datasets={
                # a factory: Ray Train calls it on every (re)start of the worker group, so the
                # sample schedule restarts at the latest checkpoint's position
                "train": TrainDatasetFactory(prep, ledger.name),
                # CPUs only: the training pool may hold every unit of data.decode_resource for
                # the whole run (Ray Data can't reserve custom resources), while _train_ingest's
                # CPU reserve keeps room for this pool
                "val": build_eval_dataset(
                    prep.val_index,
                    replace(cfg.data, decode_resource=None),
                    num_clips=1,
                    num_crops=1,
                    ledger=ledger,
                ),
            },
        )
        trainer.fit()
    progress = latest_progress(prep.run_dir) or prep.progress or Progress()
    outcome = TrainOutcome(prep.run_name, prep.run_dir, run_id, progress)
    _record(prep, outcome, ledger)
    return outcome


def _train_ingest(data: DataSettings):
    from ray.data import ExecutionResources
    from ray.train import DataConfig

    options = DataConfig.default_ingest_options()
    options.preserve_order = True  # positions in order: "consumed so far" is one number
    # The training pool streams for the whole run; without a reserve it can grow into every CPU
    # left and the validation pool, started each epoch, then waits forever for one.
    reserve = ExecutionResources(cpu=data.decode_actors[0] * data.cpus_per_decode_actor)
    options.exclude_resources = options.exclude_resources.add(reserve)
    return options


class TrainDatasetFactory:
    """Builds the remaining sample schedule from the latest checkpoint's position."""

    def __init__(self, prep: Prepared, ledger_name: str):
        self.index = prep.train_index
        self.data_cfg = prep.cfg.data
        self.seed = prep.cfg.run.seed
        self.epochs = prep.cfg.optim.epochs
        self.samples_per_epoch = prep.steps_per_epoch * prep.cfg.global_batch
        self.run_dir = prep.run_dir
        self.ledger_name = ledger_name
        # Until Ray Train registers a checkpoint of its own, a recovered run starts from there.
        self.recovered_progress = prep.progress if prep.recovered_checkpoint else None

    def __call__(self):
        from morphmlp.data.pipeline import BadDataLedger, build_train_dataset

        progress = latest_progress(self.run_dir) or self.recovered_progress
        return build_train_dataset(
            self.index,
            self.data_cfg,
            seed=self.seed,
            num_epochs=self.epochs,
            samples_per_epoch=self.samples_per_epoch,
            start_position=progress.position if progress else 0,
            ledger=BadDataLedger.lookup(self.ledger_name),
        )


# Ray Train V2's record of a run's checkpoints, in the run folder.
RAY_SNAPSHOT_FILE = "checkpoint_manager_snapshot.json"


def latest_progress(run_dir: str) -> Progress | None:
    """Progress recorded in the latest checkpoint Ray Train registered for this run, if any."""
    import ray.train

    try:
        result = ray.train.Result.from_path(run_dir)
    except (RuntimeError, FileNotFoundError):
        return None  # no snapshot: nothing was ever checkpointed
    except Exception as err:  # Ray's error for a snapshot it can't parse is internal
        raise StorageError(
            f"{run_dir}/{RAY_SNAPSHOT_FILE} can't be read ({err}). Ray Train rewrites it in place "
            "after every checkpoint, so a crash during that write can cut it short. Re-running "
            "the job sets it aside and continues from the newest complete checkpoint folder."
        ) from err
    if result.checkpoint is None:
        return None
    fs, path = result.checkpoint.filesystem, result.checkpoint.path
    with fs.open_input_stream(f"{path}/{PROGRESS_FILE}") as f:
        return Progress(**json.loads(f.read()))


def recover_from_broken_snapshot(run_dir: str) -> str | None:
    """If a crash cut Ray Train's snapshot short, set it aside and return the newest complete
    checkpoint folder (None if there is none: the run then starts over).

    Ray rewrites the snapshot in place after every checkpoint (on S3, moto's server can keep a
    PUT cut off by a killed client as well), and its controller can't start on a broken one. The
    checkpoint folders beside it are what matters; the broken file is kept, renamed.
    """
    snapshot = storage.join(run_dir, RAY_SNAPSHOT_FILE)
    if not storage.exists(snapshot):
        return None
    try:
        json.loads(storage.read_bytes(snapshot))
        return None  # whole (any other trouble with it is Ray's to report)
    except ValueError as err:  # not JSON: cut short, or with a cut-off write's leftovers
        problem = f"{storage.redact(snapshot)} can't be read ({err})"
    fs, path = storage.resolve(run_dir)
    aside = f"{path}/{RAY_SNAPSHOT_FILE}.broken-{time.strftime('%Y%m%dT%H%M%S', time.gmtime())}"
    fs.move(f"{path}/{RAY_SNAPSHOT_FILE}", aside)
    folders = fs.get_file_info(pafs.FileSelector(path))
    names = sorted(
        (f.base_name for f in folders if f.type == pafs.FileType.Directory),
        reverse=True,  # checkpoint_step%08d: newest first
    )
    for name in names:
        uri = storage.join(run_dir, name)
        if name.startswith(CHECKPOINT_DIR_PREFIX) and _complete(uri):
            log.warning(
                "%s; set aside as %s. Continuing from the newest complete checkpoint, %s",
                problem,
                aside.rsplit("/", 1)[-1],
                name,
            )
            return uri
    log.warning("%s; set aside. No complete checkpoint folder: the run starts over", problem)
    return None


def _complete(folder: str) -> bool:
    """Both files of a checkpoint are there, whole: torch's zip archive ends with its directory,
    which a cut-off copy lacks."""
    try:
        read_progress(folder)
        with (
            storage.open_input_file(storage.join(folder, CHECKPOINT_FILE)) as f,
            zipfile.ZipFile(f),
        ):
            pass
    except (StorageError, OSError, ValueError, TypeError, zipfile.BadZipFile):
        return False
    return True


def _check_architecture(cfg: TrainJobConfig) -> None:
    """Build the model on the meta device: invalid frames/size/chunk combinations raise here."""
    import torch

    with torch.device("meta"):
        pretrained, cfg.model.pretrained = cfg.model.pretrained, None
        try:
            build_model(cfg, num_classes=2)
        finally:
            cfg.model.pretrained = pretrained
    if cfg.model.pretrained and not storage.exists(cfg.model.pretrained):
        raise ConfigError(f"model.pretrained: {storage.redact(cfg.model.pretrained)} not found")


def _worker_resources(cfg: TrainJobConfig) -> dict[str, float]:
    resources = {"CPU": cfg.scaling.cpus_per_worker}
    if cfg.scaling.gpus_per_worker > 0:
        resources["GPU"] = cfg.scaling.gpus_per_worker
    return resources


def _mlflow_run(prep: Prepared, parent_run_id: str | None = None) -> str:
    """Create the MLflow run, or reopen the one an earlier attempt of this run created."""
    cfg = prep.cfg
    marker = storage.join(prep.run_dir, MLFLOW_RUN_FILE)
    existing = json.loads(storage.read_bytes(marker)) if storage.exists(marker) else None
    tags = {
        "variant": cfg.model.variant,
        "frames": str(cfg.model.num_frames),
        "img_size": str(cfg.model.img_size),
        "dataset": cfg.dataset,
        "git_commit": tracking.git_commit(),
        "run_dir": storage.redact(prep.run_dir),
    }
    if parent_run_id:
        tags["mlflow.parentRunId"] = parent_run_id
    run_id = tracking.start_run(
        cfg.run.experiment,
        prep.run_name,
        tags=tags,
        run_id=existing["run_id"] if existing else None,
    )
    if existing is None:
        storage.write_bytes_atomic(marker, json.dumps({"run_id": run_id}).encode())
        tracker = tracking.Tracker(run_id)
        params = {
            **flatten(to_dict(cfg)),
            "dataset_uri": storage.redact(prep.index_uri),
            "dataset_hash": prep.train_index.content_hash(),
            "num_train_videos": len(prep.train_index),
            "num_val_videos": len(prep.val_index),
            "num_classes": len(prep.train_index.class_names),
            "steps_per_epoch": prep.steps_per_epoch,
            "global_batch": cfg.global_batch,
            "scaled_lr": cfg.scaled_lr,
            "world_size": cfg.scaling.workers,
            "git_commit": tags["git_commit"],
            **tracking.package_versions(),
        }
        tracker.log_params(params)
        import yaml

        tracker.log_text(yaml.safe_dump(to_dict(cfg), sort_keys=False), "config.yaml")
    return run_id


def _record(prep: Prepared, outcome: TrainOutcome, ledger) -> None:
    """After fit: bad-data report, curves, model files and registered versions in MLflow."""
    from morphmlp.data.pipeline import BadDataError

    tracker = tracking.Tracker(outcome.mlflow_run_id)
    cfg = prep.cfg
    summary = ledger.summary()
    with tempfile.TemporaryDirectory() as tmp:
        if summary["bad"]:
            report = storage.join(prep.run_dir, "bad_data.csv")
            ledger.write_report(report)
            outcome.bad_data_report = report
            local = os.path.join(tmp, "bad_data.csv")
            with open(local, "wb") as f:
                f.write(storage.read_bytes(report))
            tracker.log_artifact(local)
        if summary["fraction"] > cfg.data.max_bad_fraction:
            tracker.end("FAILED")
            raise BadDataError(
                f"{summary['bad']} of {summary['seen']} videos were unreadable "
                f"({100 * summary['fraction']:.1f}% > max_bad_fraction "
                f"{100 * cfg.data.max_bad_fraction:.1f}%); see {outcome.bad_data_report}"
            )
        _log_curves(tracker, tmp)
        for kind in ("best", "final"):
            uri = storage.join(prep.run_dir, kind, "model.pt")
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
                            "run": prep.run_name,
                            "kind": kind,
                            "val_top1": f"{outcome.progress.best_top1:.4f}",
                        },
                    )
                except Exception as err:  # registry outage: the files are safe in run_dir
                    log.warning("could not register %s model in MLflow: %s", kind, err)
    tracker.log_metrics(
        {"best_val_top1": outcome.progress.best_top1, "best_epoch": outcome.progress.best_epoch},
        outcome.progress.step,
    )
    tracker.end("FINISHED")


def _log_curves(tracker: tracking.Tracker, tmp: str) -> None:
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


def _stem(uri: str) -> str:
    base = os.path.basename(uri.rstrip("/"))
    return os.path.splitext(base)[0] or "dataset"
