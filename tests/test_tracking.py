"""MLflow tracking against a real `mlflow server` on 127.0.0.1: an outage costs the caller nothing
(calls are queued, one warning), and what was queued reaches the server once it is back."""

from __future__ import annotations

import logging
import os
import subprocess

import pytest
from support import free_port, start_mlflow_server

from morphmlp import tracking

pytestmark = pytest.mark.slow


def _kill(proc: subprocess.Popen) -> None:
    os.killpg(proc.pid, 9)
    proc.wait()


def test_an_outage_queues_calls_warns_once_and_delivers_them_when_the_server_is_back(
    tmp_path, caplog, capsys
):
    port = free_port()
    uri = f"http://127.0.0.1:{port}"
    server = start_mlflow_server(tmp_path, port)
    try:
        run_id = tracking.start_run("outage", "r", tags={}, uri=uri)
        tracker = tracking.Tracker(run_id, uri, retry_s=0.5)
        tracker.log_metrics({"m": 0.0}, step=0)
        assert tracker.flush(timeout_s=30)

        _kill(server)
        with caplog.at_level(logging.WARNING, logger="morphmlp.tracking"):
            for step in range(1, 21):
                tracker.log_metrics({"m": float(step)}, step=step)
            assert not tracker.flush(timeout_s=3)  # the server is away: nothing can be sent
            server = start_mlflow_server(tmp_path, port)
            assert tracker.flush(timeout_s=60)
        failures = [r for r in caplog.records if "failed" in r.getMessage()]
        assert len(failures) == 1, [r.getMessage() for r in caplog.records]
        assert any("is back" in r.getMessage() for r in caplog.records)

        history = tracking.client(uri).get_metric_history(run_id, "m")
        assert sorted(m.step for m in history) == list(range(21))
        capsys.readouterr()
        tracker.end("FINISHED")
        assert tracking.client(uri).get_run(run_id).info.status == "FINISHED"
        # MLflow's own "🏃 View run ... at: URL" lines stay off the job's console
        assert "View run" not in capsys.readouterr().out
    finally:
        _kill(server)


def test_params_past_the_api_batch_limit_are_all_logged(tmp_path):
    uri = f"sqlite:///{tmp_path}/mlflow.db"
    run_id = tracking.start_run("params", "r", tags={}, uri=uri)
    params = {f"p{i:03d}": i for i in range(250)}
    params["long"] = "x" * 10_000  # over MLflow's value limit: cut, not refused
    tracking.log_params(tracking.client(uri), run_id, params)
    logged = tracking.client(uri).get_run(run_id).data.params
    assert len(logged) == 251
    assert logged["p249"] == "249"
    assert 0 < len(logged["long"]) < 10_000
