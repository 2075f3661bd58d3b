"""Helpers that several test files use; fixtures live in conftest.py. pytest puts tests/ on
sys.path (the files here have no package), so a test file imports these as `from support import`.
"""

from __future__ import annotations

import importlib.util
import os
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path
from types import ModuleType

REPO = Path(__file__).resolve().parents[1]
XS_CLASSES = ["wave", "clap", "jump", "sit"]  # the class names of save_xs_model's file


def load_job(name: str) -> ModuleType:
    """jobs/<name>.py as a module, so that a test calls its main() in this process."""
    spec = importlib.util.spec_from_file_location(f"job_{name}", REPO / "jobs" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def error_lines(err: str) -> list[str]:
    """The `error: ...` lines of a job's stderr."""
    return [line for line in err.splitlines() if line.startswith("error:")]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_mlflow_server(root, port: int) -> subprocess.Popen:
    """A real `mlflow server` on 127.0.0.1:port (sqlite store and artifacts under `root`), in
    its own process group so that killing the group kills its workers; returns once healthy."""
    proc = subprocess.Popen(
        [
            os.path.join(os.path.dirname(sys.executable), "mlflow"),
            *("server", "--host", "127.0.0.1", "--port", str(port), "--workers", "1"),
            *("--backend-store-uri", f"sqlite:///{root}/mlflow.db"),
            *("--artifacts-destination", os.path.join(str(root), "artifacts")),
        ],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        start_new_session=True,
    )
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=2):
                return proc
        except OSError:
            if proc.poll() is not None:
                raise RuntimeError("mlflow server exited") from None
            time.sleep(0.5)
    os.killpg(proc.pid, 9)
    raise RuntimeError("mlflow server did not start")


def save_xs_model(path: str, seed: int = 0) -> str:
    """An xs model.pt for XS_CLASSES with the demo recipe's data protocol (8 frames, 112², short
    side 128), random weights: the prediction and export tests need real weights, not good ones."""
    import torch

    from morphmlp.config import to_dict
    from morphmlp.models import create_model
    from morphmlp.train.checkpoint import export_model
    from morphmlp.train.config import resolve_config

    torch.manual_seed(seed)
    model = create_model("xs", num_classes=len(XS_CLASSES))
    export_model(
        path,
        model=model,
        model_config=to_dict(model.cfg),
        class_names=XS_CLASSES,
        data_config=to_dict(resolve_config({}).data),
        metrics={},
    )
    return path


def read_predictions(path: str) -> list[dict]:
    """The rows jobs/predict.py wrote to --output (.csv or .parquet)."""
    import pyarrow.csv as pacsv
    import pyarrow.parquet as pq

    table = pacsv.read_csv(path) if path.endswith(".csv") else pq.read_table(path)
    return table.to_pylist()
