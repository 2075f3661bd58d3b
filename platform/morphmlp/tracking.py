"""MLflow conventions in one place.

- Embedded default: a SQLite store `mlflow.db` and artifacts under `mlruns/` in the working
  directory; `MLFLOW_TRACKING_URI` selects a server instead.
- One experiment per job kind (morphmlp-train, morphmlp-tune, morphmlp-eval); run names and tags
  carry variant, frames, dataset and git commit; registered model name `morphmlp`.
- Only the driver and rank 0 log. An outage mid-run never stops training: calls warn once and
  are dropped until the server answers again. Reachability is checked before any work starts.
"""

from __future__ import annotations

import collections
import logging
import os
import subprocess
import threading
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
        client(uri).search_experiments(max_results=1)
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


# MLflow's client retries an unreachable server with backoff for minutes by default; a job that
# checks reachability before work starts wants an answer in seconds. And its INFO lines are not the
# job's, nor are the two "View run / View experiment" lines it writes to stdout each time a run
# on a server ends (the jobs print the run and the UI themselves, once). Set before any client is
# made; a value the user exported wins.
_CLIENT_DEFAULTS = {
    "MLFLOW_LOGGING_LEVEL": "WARNING",
    "MLFLOW_SUPPRESS_PRINTING_URL_TO_STDOUT": "true",
    "MLFLOW_HTTP_REQUEST_TIMEOUT": "10",
    "MLFLOW_HTTP_REQUEST_MAX_RETRIES": "2",
    "MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR": "1",
}
_PARAMS_PER_CALL = 100  # the REST API takes at most 100 params per log_batch


def client(uri: str | None = None):
    """The one way this project makes an MLflow client (bounded HTTP timeouts and retries)."""
    for key, value in _CLIENT_DEFAULTS.items():
        os.environ.setdefault(key, value)
    import mlflow

    # MLflow's own level setting (MLFLOW_LOGGING_LEVEL, read when mlflow is first imported):
    # WARNING unless the user set it, so its INFO lines ("Creating initial MLflow database
    # tables...", "Waiting up to 300 seconds for model version to finish creation") stay out of
    # the job's console; its warnings and errors still show.
    logging.getLogger("mlflow").setLevel(os.environ["MLFLOW_LOGGING_LEVEL"].upper())
    # urllib3 warns at every HTTP retry ("Retrying (Retry(total=1, ...)) after connection broken
    # by ..."): 6-28 lines per MLflow outage (docs/benchmarks.md). The Tracker says once that
    # MLflow is down and once that it is back, and a call that fails for good still raises.
    logging.getLogger("urllib3.connectionpool").setLevel(logging.ERROR)
    return mlflow.MlflowClient(uri or tracking_uri())


def log_params(mlflow_client, run_id: str, params: Mapping[str, Any]) -> None:
    """Log any number of params (values cut to MLflow's length limit), in API-sized batches."""
    from mlflow.entities import Param

    items = [Param(k, str(v)[:_MAX_PARAM_LEN]) for k, v in params.items()]
    for i in range(0, len(items), _PARAMS_PER_CALL):
        mlflow_client.log_batch(run_id, params=items[i : i + _PARAMS_PER_CALL])


def start_run(
    experiment: str,
    run_name: str,
    *,
    tags: Mapping[str, str],
    uri: str | None = None,
    run_id: str | None = None,
) -> str:
    """Create a run (or reopen `run_id` when resuming) and return its id; never left active."""
    mlflow_client = client(uri)
    if run_id is not None:
        mlflow_client.update_run(run_id, status="RUNNING")
        return run_id
    exp = mlflow_client.get_experiment_by_name(experiment)
    exp_id = exp.experiment_id if exp else mlflow_client.create_experiment(experiment)
    run = mlflow_client.create_run(exp_id, run_name=run_name, tags=dict(tags))
    return run.info.run_id


class Tracker:
    """Logs to one MLflow run; a no-op when disabled (ranks other than 0).

    Metrics, params and tags go through a queue that one background thread sends, so a slow or
    dead server never stalls a training step. During an outage the thread warns once, keeps the
    calls (up to `max_queued`, oldest dropped past that, with one warning) and retries every
    `retry_s`; when the server answers again it says so and sends what was kept. `flush` waits
    for the queue (bounded); artifacts and `end` flush first, then call the server directly.
    """

    def __init__(
        self,
        run_id: str | None,
        uri: str | None = None,
        *,
        enabled: bool = True,
        retry_s: float = 5.0,
        max_queued: int = 10_000,
    ):
        self.run_id = run_id
        self.enabled = enabled and run_id is not None
        self._uri = uri or tracking_uri()
        self._client = None
        self._retry_s = retry_s
        self._max_queued = max_queued
        self._queue: collections.deque = collections.deque()
        self._wake = threading.Condition()
        self._busy = False
        self._thread: threading.Thread | None = None
        self._down_since: float | None = None
        self._dropped = 0

    @property
    def client(self):
        if self._client is None:
            self._client = client(self._uri)
        return self._client

    # -- the queue -------------------------------------------------------------------------
    def _submit(self, what: str, fn, *args, **kwargs) -> None:
        if not self.enabled:
            return
        with self._wake:
            if len(self._queue) >= self._max_queued:
                self._queue.popleft()
                self._dropped += 1
                if self._dropped == 1:
                    log.warning(
                        "MLflow queue full (%d calls): dropping the oldest", self._max_queued
                    )
            self._queue.append((what, fn, args, kwargs))
            if self._thread is None:
                self._thread = threading.Thread(target=self._send_forever, daemon=True)
                self._thread.start()
            self._wake.notify()

    def _send_forever(self) -> None:
        while True:
            with self._wake:
                while not self._queue:
                    self._busy = False
                    self._wake.notify_all()
                    self._wake.wait()
                self._busy = True
                what, fn, args, kwargs = self._queue[0]
            if self._attempt(what, fn, *args, **kwargs):
                with self._wake:
                    self._queue.popleft()
            else:
                time.sleep(self._retry_s)

    def _attempt(self, what: str, fn, *args, **kwargs) -> bool:
        try:
            fn(*args, **kwargs)
        except Exception as err:  # any failure of the tracking backend
            if self._down_since is None:
                self._down_since = time.time()
                log.warning("MLflow %s failed (%s); training continues without it", what, err)
            return False
        if self._down_since is not None:
            log.warning(
                "MLflow is back after %.0f s; sending %d queued calls",
                time.time() - self._down_since,
                len(self._queue),
            )
            self._down_since = None
        return True

    def flush(self, timeout_s: float = 30.0) -> bool:
        """Wait until every queued call was sent; False if the server stayed away that long."""
        deadline = time.monotonic() + timeout_s
        with self._wake:
            while self._queue or self._busy:
                left = deadline - time.monotonic()
                if left <= 0:
                    log.warning(
                        "MLflow: %d logging calls (metrics, params, tags) not sent: the server "
                        "was unreachable for %.0f s; the run's history in MLflow is incomplete",
                        len(self._queue),
                        timeout_s,
                    )
                    return False
                self._wake.wait(min(left, 1.0))
        return True

    def _call_now(self, what: str, fn, *args, **kwargs) -> None:
        if self.enabled:
            self.flush()
            self._attempt(what, fn, *args, **kwargs)

    # -- what callers log ------------------------------------------------------------------
    def log_metrics(self, metrics: Mapping[str, float], step: int) -> None:
        from mlflow.entities import Metric

        now = int(time.time() * 1000)
        batch = [Metric(k, float(v), now, step) for k, v in metrics.items()]
        self._submit("log_metrics", self.client.log_batch, self.run_id, metrics=batch)

    def log_params(self, params: Mapping[str, Any]) -> None:
        self._submit("log_params", log_params, self.client, self.run_id, params)

    def set_tags(self, tags: Mapping[str, str]) -> None:
        from mlflow.entities import RunTag

        items = [RunTag(k, str(v)) for k, v in tags.items()]
        self._submit("set_tags", self.client.log_batch, self.run_id, tags=items)

    def log_dataset(self, *, name: str, source: str, digest: str, context: str) -> None:
        """The run page's Datasets panel: what was trained on (source URI, content hash)."""
        from mlflow.entities import Dataset, DatasetInput, InputTag

        dataset = Dataset(name=name, digest=digest[:36], source_type="uri", source=source)
        entry = DatasetInput(dataset, tags=[InputTag("mlflow.data.context", context)])
        self._submit("log_inputs", self.client.log_inputs, self.run_id, datasets=[entry])

    def log_artifact(self, local_path: str, artifact_path: str | None = None) -> None:
        self._call_now(
            "log_artifact", self.client.log_artifact, self.run_id, local_path, artifact_path
        )

    def log_text(self, text: str, artifact_file: str) -> None:
        self._call_now("log_text", self.client.log_text, self.run_id, text, artifact_file)

    def end(self, status: str = "FINISHED") -> None:
        self._call_now("end_run", self.client.set_terminated, self.run_id, status)


def register_model_version(
    run_id: str, artifact_path: str, *, tags: Mapping[str, str], uri: str | None = None
) -> str:
    """Register `runs:/<run_id>/<artifact_path>` as a version of `morphmlp`; idempotent per
    (run, artifact path) so a re-run after a crash does not register twice."""
    import mlflow

    mlflow_client = client(uri)
    source = f"runs:/{run_id}/{artifact_path}"
    try:
        mlflow_client.create_registered_model(REGISTERED_MODEL)
    except mlflow.exceptions.MlflowException as err:
        if "RESOURCE_ALREADY_EXISTS" not in str(err.error_code):
            raise
    for mv in mlflow_client.search_model_versions(
        f"name='{REGISTERED_MODEL}' and run_id='{run_id}'"
    ):
        if mv.source == source:
            return mv.version
    mv = mlflow_client.create_model_version(
        REGISTERED_MODEL, source, run_id=run_id, tags=dict(tags)
    )
    return mv.version


def ui_hint(uri: str | None = None) -> str:
    uri = uri or tracking_uri()
    if uri.startswith(("http://", "https://")):
        return f"open {uri}"
    return f"mlflow ui --backend-store-uri {uri}  (then open http://127.0.0.1:5000)"


# Registry aliases. Training moves `newest` to the run's final model and `best` to the version
# with the highest validation top-1 (each version's `val_top1` tag: its own run's val split);
# `jobs/reevaluate.py --promote BENCHMARK` moves `champion` to that benchmark's top version.
# (MLflow reserves the alias name "latest": `models:/morphmlp/latest` is its newest version.)
ALIAS_BEST, ALIAS_NEWEST, ALIAS_CHAMPION = "best", "newest", "champion"


def set_alias(alias: str, version: str, uri: str | None = None) -> None:
    client(uri).set_registered_model_alias(REGISTERED_MODEL, alias, str(version))


def update_training_aliases(versions: Mapping[str, str], uri: str | None = None) -> None:
    """After a training run registered `versions` ({"best": v, "final": v}): move the aliases."""
    latest = versions.get("final") or versions.get("best")
    if latest is not None:
        set_alias(ALIAS_NEWEST, latest, uri)
    scored = [
        (float(mv.tags["val_top1"]), int(mv.version))
        for mv in client(uri).search_model_versions(f"name='{REGISTERED_MODEL}'")
        if _is_number(mv.tags.get("val_top1"))
    ]
    if scored:
        set_alias(ALIAS_BEST, str(max(scored)[1]), uri)


def _is_number(text: str | None) -> bool:
    try:
        float(text)  # type: ignore[arg-type]
    except (TypeError, ValueError):
        return False
    return True
