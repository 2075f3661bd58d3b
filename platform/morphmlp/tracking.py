"""MLflow conventions in one place.

- Embedded default: a SQLite store `mlflow.db` and artifacts under `mlruns/` in the working
  directory; `MLFLOW_TRACKING_URI` selects a server instead.
- One experiment per job kind (morphmlp-train, morphmlp-tune, morphmlp-eval); run names and tags
  carry variant, frames, dataset and git commit; registered model name `morphmlp`.
- Only the driver and rank 0 log. An outage mid-run never stops training: calls warn once and
  are dropped until the server answers again. Reachability is checked before any work starts.
"""

from __future__ import annotations

import logging
import os
import subprocess
import time
from collections.abc import Mapping
from typing import Any

from morphmlp.errors import MorphMLPError

log = logging.getLogger(__name__)

REGISTERED_MODEL = "morphmlp"
_MAX_PARAM_LEN = 6000  # MLflow's limit on a param value


class TrackingError(MorphMLPError):
    """The MLflow tracking server can't be reached or refused a request at start."""


def tracking_uri() -> str:
    """The tracking URI every process of a job uses (made absolute for the local default)."""
    uri = os.environ.get("MLFLOW_TRACKING_URI")
    if uri:
        return uri
    return f"sqlite:///{os.path.abspath('mlflow.db')}"


def check_reachable(uri: str, timeout_s: float = 10.0) -> None:
    """Fail fast with one line if the tracking store can't be used."""
    import mlflow

    if uri.startswith(("http://", "https://")):
        import urllib.request

        try:
            with urllib.request.urlopen(f"{uri.rstrip('/')}/health", timeout=timeout_s) as r:
                if r.status != 200:
                    raise TrackingError(f"MLflow server {uri} answered HTTP {r.status} on /health")
        except OSError as err:
            raise TrackingError(f"MLflow server {uri} is unreachable: {err}") from err
        return
    try:
        mlflow.MlflowClient(uri).search_experiments(max_results=1)
    except Exception as err:
        raise TrackingError(f"MLflow store {uri} can't be opened: {err}") from err


def git_commit() -> str:
    """The checkout's commit, with -dirty when tracked files changed; "unknown" outside git."""

    def git(*args: str) -> subprocess.CompletedProcess:
        here = os.path.dirname(os.path.abspath(__file__))
        return subprocess.run(["git", *args], capture_output=True, text=True, timeout=5, cwd=here)

    try:
        out = git("rev-parse", "--short=12", "HEAD")
        if out.returncode == 0:
            dirty = git("status", "--porcelain", "--untracked-files=no").stdout.strip()
            return out.stdout.strip() + ("-dirty" if dirty else "")
    except (OSError, subprocess.SubprocessError):
        pass
    return "unknown"


def package_versions() -> dict[str, str]:
    from importlib.metadata import PackageNotFoundError, version

    versions = {}
    for name in ("torch", "ray", "mlflow", "av", "pyarrow", "pillow", "morphmlp"):
        try:
            versions[f"version.{name}"] = version(name)
        except PackageNotFoundError:
            versions[f"version.{name}"] = "absent"
    return versions


def start_run(
    experiment: str,
    run_name: str,
    *,
    tags: Mapping[str, str],
    uri: str | None = None,
    run_id: str | None = None,
) -> str:
    """Create a run (or reopen `run_id` when resuming) and return its id; never left active."""
    import mlflow

    client = mlflow.MlflowClient(uri or tracking_uri())
    if run_id is not None:
        client.update_run(run_id, status="RUNNING")
        return run_id
    exp = client.get_experiment_by_name(experiment)
    exp_id = exp.experiment_id if exp else client.create_experiment(experiment)
    run = client.create_run(exp_id, run_name=run_name, tags=dict(tags))
    return run.info.run_id


class Tracker:
    """Logs to one MLflow run; a no-op when disabled (ranks other than 0).

    Failures are logged as a single warning per outage and dropped: the metric history gets a
    gap, training goes on.
    """

    def __init__(self, run_id: str | None, uri: str | None = None, *, enabled: bool = True):
        self.run_id = run_id
        self.enabled = enabled and run_id is not None
        self._uri = uri or tracking_uri()
        self._client = None
        self._down_since: float | None = None

    @property
    def client(self):
        if self._client is None:
            import mlflow

            self._client = mlflow.MlflowClient(self._uri)
        return self._client

    def _call(self, what: str, fn, *args, **kwargs) -> Any:
        if not self.enabled:
            return None
        try:
            result = fn(*args, **kwargs)
        except Exception as err:  # any failure of the tracking backend
            if self._down_since is None:
                self._down_since = time.time()
                log.warning("MLflow %s failed (%s); training continues without it", what, err)
            return None
        if self._down_since is not None:
            log.warning("MLflow is back after %.0f s", time.time() - self._down_since)
            self._down_since = None
        return result

    def log_metrics(self, metrics: Mapping[str, float], step: int) -> None:
        from mlflow.entities import Metric

        now = int(time.time() * 1000)
        batch = [Metric(k, float(v), now, step) for k, v in metrics.items()]
        self._call("log_metrics", self.client.log_batch, self.run_id, metrics=batch)

    def log_params(self, params: Mapping[str, Any]) -> None:
        from mlflow.entities import Param

        items = [Param(k, str(v)[:_MAX_PARAM_LEN]) for k, v in params.items()]
        for i in range(0, len(items), 100):  # the API takes at most 100 params per call
            self._call("log_params", self.client.log_batch, self.run_id, params=items[i : i + 100])

    def set_tags(self, tags: Mapping[str, str]) -> None:
        from mlflow.entities import RunTag

        items = [RunTag(k, str(v)) for k, v in tags.items()]
        self._call("set_tags", self.client.log_batch, self.run_id, tags=items)

    def log_artifact(self, local_path: str, artifact_path: str | None = None) -> None:
        self._call("log_artifact", self.client.log_artifact, self.run_id, local_path, artifact_path)

    def log_text(self, text: str, artifact_file: str) -> None:
        self._call("log_text", self.client.log_text, self.run_id, text, artifact_file)

    def end(self, status: str = "FINISHED") -> None:
        self._call("end_run", self.client.set_terminated, self.run_id, status)


def register_model_version(
    run_id: str, artifact_path: str, *, tags: Mapping[str, str], uri: str | None = None
) -> str:
    """Register `runs:/<run_id>/<artifact_path>` as a version of `morphmlp`; idempotent per
    (run, artifact path) so a re-run after a crash does not register twice."""
    import mlflow

    client = mlflow.MlflowClient(uri or tracking_uri())
    source = f"runs:/{run_id}/{artifact_path}"
    try:
        client.create_registered_model(REGISTERED_MODEL)
    except mlflow.exceptions.MlflowException as err:
        if "RESOURCE_ALREADY_EXISTS" not in str(err.error_code):
            raise
    for mv in client.search_model_versions(f"name='{REGISTERED_MODEL}' and run_id='{run_id}'"):
        if mv.source == source:
            return mv.version
    mv = client.create_model_version(REGISTERED_MODEL, source, run_id=run_id, tags=dict(tags))
    return mv.version


def ui_hint(uri: str | None = None) -> str:
    uri = uri or tracking_uri()
    if uri.startswith(("http://", "https://")):
        return f"open {uri}"
    return f"mlflow ui --backend-store-uri {uri}  (then open http://127.0.0.1:5000)"
