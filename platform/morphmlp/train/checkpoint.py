"""Training checkpoints: one file each, written atomically.

`checkpoint.pt` holds everything needed to continue (model, optimizer, grad scaler, step, epoch,
schedule position, best metric, resolved config). The learning rate is a pure function of the
step and every random draw is seeded from (seed, rank, step), so step + seed restore the
schedule and the RNG streams exactly. `model.pt` is the weights-only export that MLflow
registers and evaluation loads: weights, architecture, class names and metrics.
"""

from __future__ import annotations

import io
import json
import os
from dataclasses import asdict, dataclass
from typing import Any

import torch

from morphmlp import storage

CHECKPOINT_FILE = "checkpoint.pt"
PROGRESS_FILE = "progress.json"
CHECKPOINT_DIR_PREFIX = "checkpoint_step"  # + the step, 8 digits: names sort by step
MODEL_FILE = "model.pt"
# What the bad-data ledgers found over every attempt of a run, in the run folder (loop.py writes
# it at each epoch's end, the driver reads it before a re-run starts).
BAD_DATA_FILE = "bad_data.json"


@dataclass
class Progress:
    step: int = 0  # optimizer steps completed
    epoch: int = 0  # epochs completed
    position: int = 0  # the sample schedule's cursor: the truth of how far the run is
    global_batch: int = 0  # the global batch in force when saved (0: before the first step)
    best_top1: float = -1.0
    best_epoch: int = -1
    mlflow_run_id: str | None = None


def _serialize(obj: Any) -> bytes:
    buf = io.BytesIO()
    torch.save(obj, buf)
    return buf.getvalue()


def write_checkpoint_dir(
    directory: str,
    *,
    model: torch.nn.Module,
    optimizer: torch.optim.Optimizer,
    scaler: torch.amp.GradScaler | None,
    progress: Progress,
    config: dict[str, Any],
) -> None:
    """Write into a local directory that `ray.train.report` then persists.

    Ray registers a checkpoint only after the whole directory is uploaded, so a crash during
    upload leaves nothing that resume would pick up.
    """
    state = {
        "model": unwrap(model).state_dict(),
        "optimizer": optimizer.state_dict(),
        "scaler": scaler.state_dict() if scaler is not None else None,
        "progress": asdict(progress),
        "config": config,
    }
    storage.write_bytes_atomic(os.path.join(directory, CHECKPOINT_FILE), _serialize(state))
    # small sidecar so the driver can find the resume point without loading weights
    storage.write_bytes_atomic(
        os.path.join(directory, PROGRESS_FILE), json.dumps(asdict(progress)).encode()
    )


def read_checkpoint_dir(directory: str) -> dict[str, Any]:
    return torch.load(
        os.path.join(directory, CHECKPOINT_FILE), map_location="cpu", weights_only=True
    )


def read_progress(directory: str) -> Progress:
    """The progress sidecar of a checkpoint folder (a local path or a URI)."""
    return Progress(**json.loads(storage.read_bytes(storage.join(directory, PROGRESS_FILE))))


def export_model(
    uri: str,
    *,
    model: torch.nn.Module,
    model_config: dict[str, Any],
    class_names: list[str],
    data_config: dict[str, Any],
    metrics: dict[str, float],
) -> None:
    """Weights-only export (what gets registered and evaluated), written atomically."""
    payload = {
        "model": {k: v.detach().float().cpu() for k, v in unwrap(model).state_dict().items()},
        "model_config": model_config,
        "class_names": list(class_names),
        "data_config": data_config,
        "metrics": dict(metrics),
    }
    storage.write_bytes_atomic(uri, _serialize(payload))


def unwrap(model: torch.nn.Module) -> torch.nn.Module:
    """The plain module under DDP and torch.compile wrappers."""
    while True:
        if hasattr(model, "module"):  # DistributedDataParallel
            model = model.module
        elif hasattr(model, "_orig_mod"):  # torch.compile
            model = model._orig_mod
        else:
            return model
