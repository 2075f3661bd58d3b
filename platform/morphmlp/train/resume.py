"""Where a run stands and how it continues: reading Ray Train's record of a run's checkpoints,
recovering from a snapshot a crash cut short, and restoring a worker's state from a checkpoint.

The driver asks `latest_progress` (and `recover_from_broken_snapshot`) before it launches
anything; every worker calls `restore` once, before its first step.
"""

from __future__ import annotations

import json
import logging
import time
import zipfile
from typing import TYPE_CHECKING

import pyarrow.fs as pafs

from morphmlp import storage
from morphmlp.errors import MorphMLPError, StorageError
from morphmlp.train.checkpoint import (
    CHECKPOINT_DIR_PREFIX,
    CHECKPOINT_FILE,
    PROGRESS_FILE,
    Progress,
    read_checkpoint_dir,
    read_progress,
)

if TYPE_CHECKING:
    import torch

log = logging.getLogger("morphmlp.train")

# Ray Train V2's record of a run's checkpoints, in the run folder.
RAY_SNAPSHOT_FILE = "checkpoint_manager_snapshot.json"


class ResumeError(MorphMLPError):
    """A run name that clashes with (or is missing from) the storage, given --resume."""


def latest_progress(run_dir: str) -> Progress | None:
    """Progress recorded in the latest checkpoint Ray Train registered for this run, if any."""
    import ray.train
    from ray.train.v2._internal.execution.checkpoint import checkpoint_manager

    # Reading the snapshot builds Ray Train's CheckpointManager, which logs a 3-line INFO notice
    # meant for a run that starts ("A run snapshot was found ... will be loaded ... If you meant
    # to start a brand new training job ..."); here it is only read, and the driver's own line
    # says "Resuming run ...". The run's controller keeps it quiet by its LoggingConfig.
    logging.getLogger(checkpoint_manager.__name__).setLevel(logging.WARNING)
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


def restore(
    model: torch.nn.Module,
    optimizer: torch.optim.Optimizer,
    scaler: torch.amp.GradScaler | None,
    *,
    recovered_checkpoint: str | None,
    mlflow_run_id: str | None,
    rank: int,
) -> Progress:
    """On a Ray Train worker: load model, optimizer and grad-scaler state from the checkpoint the
    run continues from, and return its Progress (a fresh one when there is none).

    That checkpoint is Ray Train's latest (after a worker restart or a re-run), or, while Ray
    has none of its own, the folder `recover_from_broken_snapshot` found.
    """
    import ray.train

    checkpoint = ray.train.get_checkpoint()
    if checkpoint is None and recovered_checkpoint:
        fs, path = storage.resolve(recovered_checkpoint)
        checkpoint = ray.train.Checkpoint(path, filesystem=fs)
    if checkpoint is None:
        return Progress(mlflow_run_id=mlflow_run_id)
    with checkpoint.as_directory() as directory:
        state = read_checkpoint_dir(directory)
    model.load_state_dict(state["model"])
    optimizer.load_state_dict(state["optimizer"])
    if scaler is not None and state.get("scaler"):
        scaler.load_state_dict(state["scaler"])
    progress = Progress(**state["progress"])
    if rank == 0:
        log.info("resumed at epoch %d, step %d", progress.epoch, progress.step)
    return progress
