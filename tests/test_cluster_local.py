"""cluster/local for real: up.sh starts a Ray head, a worker node and an MLflow server with token
auth on, every port of theirs bound to the loopback interface; a 2-worker training job submitted
with the token runs with one Train worker on each node, one without it (or with a wrong one) is
refused; down.sh leaves none of the started processes behind.

Every process gets its own ports, state and temp dirs, so the test runs beside other Ray
instances on the machine. The test's own environment is never changed: Ray reads RAY_AUTH_MODE
from it, and other tests start Ray in this process.
"""

from __future__ import annotations

import ipaddress
import json
import os
import shlex
import shutil
import socket
import stat
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
import uuid
from pathlib import Path

import psutil
import pytest
from support import free_port

REPO = Path(__file__).resolve().parents[1]
UP = REPO / "cluster" / "local" / "up.sh"
DOWN = REPO / "cluster" / "local" / "down.sh"
VENV_BIN = Path(sys.executable).parent

# The job submitted with the token, run from the repository root with `--working-dir .`: the
# training job on a few demo videos, for one epoch, with 2 Train workers, its decode actors
# asking for the "decode" resource that up.sh gives the worker nodes (as the cluster configs do).
# 0.6 CPU per Train worker on nodes of 1 CPU: two can't share a node, so there is one on the head
# and one on the worker node; the 0.4 left on each is for the decode actors (training pool on the
# worker node, validation pool on the head).
TRAIN_ARGS = (
    "--variant xs --epochs 1 --batch-size 4 --workers 2 --cpus-per-worker 0.6 "
    "--set data.decode_resource=decode --set data.cpus_per_decode_actor=0.4"
)
HEAD_CPUS, WORKERS, WORKER_CPUS = 1, 1, 1


def check_job(output: str, mlflow_uri: str, index_uri: str) -> None:
    """The job trained, logged to the cluster's MLflow server and registered its models."""
    import mlflow

    assert "Best model:" in output, output[-2000:]
    client = mlflow.MlflowClient(mlflow_uri)
    experiment = client.get_experiment_by_name("morphmlp-demo")
    (run,) = client.search_runs([experiment.experiment_id])
    assert run.info.status == "FINISHED"
    assert run.data.params["dataset_uri"] == index_uri
    assert run.data.params["world_size"] == "2" and run.data.params["model.variant"] == "xs"
    assert run.data.tags["variant"] == "xs" and run.data.tags["git_commit"]
    assert 0.0 <= run.data.metrics["val/top1"] <= 1.0
    assert run.data.metrics["train/clips_per_s"] > 0
    versions = client.search_model_versions(f"run_id='{run.info.run_id}'")
    assert {v.tags["kind"] for v in versions} == {"best", "final"}
    assert all(v.name == "morphmlp" and v.tags["dataset"] == index_uri for v in versions)


def _submit(env: dict[str, str], *args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [str(VENV_BIN / "ray"), "job", "submit", *args],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=240,
    )


def _get_json(url: str, token: str) -> dict:
    request = urllib.request.Request(url, headers={"Authorization": f"Bearer {token}"})
    with urllib.request.urlopen(request, timeout=10) as response:
        return json.load(response)


def _wait_running(dashboard: str, token: str, submission_id: str) -> None:
    for _ in range(120):
        status = _get_json(f"{dashboard}/api/jobs/{submission_id}", token)["status"]
        if status == "RUNNING":
            return
        assert status == "PENDING", f"job {submission_id} is {status}"
        time.sleep(1)
    raise AssertionError(f"job {submission_id} never started")


def _tree(pids: list[int]) -> dict[int, float]:
    """The processes and all their descendants, with start times (a PID may be reused)."""
    found = {}
    for pid in pids:
        try:
            root = psutil.Process(pid)
            for proc in [root, *root.children(recursive=True)]:
                found[proc.pid] = proc.create_time()
        except psutil.NoSuchProcess:
            pass
    return found


def _survivors(tree: dict[int, float], *markers: str) -> list[str]:
    """Processes of `tree` still running, and any process whose command line names a marker."""
    left = []
    for proc in psutil.process_iter(["pid", "cmdline", "create_time"]):
        cmdline = " ".join(proc.info["cmdline"] or [])
        if tree.get(proc.info["pid"]) == proc.info["create_time"] or any(
            marker in cmdline for marker in markers
        ):
            left.append(f"{proc.info['pid']}: {cmdline[:150]}")
    return left


def _job_status(dashboard: str, token: str, submission_id: str) -> str:
    return _get_json(f"{dashboard}/api/jobs/{submission_id}", token)["status"]


def _state(dashboard: str, token: str, what: str) -> list[dict]:
    """Rows of Ray's state API (dead actors included), as `ray list` shows them."""
    reply = _get_json(f"{dashboard}/api/v0/{what}?detail=1&limit=10000", token)
    return reply["data"]["result"]["result"]


def _listeners(roots: list[int]) -> dict[tuple[str, int], str]:
    """(address, port) -> command line, of every listening TCP socket of the processes up.sh
    started and their descendants (Ray's GCS, raylets, agents, workers; MLflow's workers)."""
    tree = _tree(roots)
    found = {}
    for conn in psutil.net_connections(kind="inet"):
        if conn.status == psutil.CONN_LISTEN and conn.pid in tree:
            try:
                cmdline = " ".join(psutil.Process(conn.pid).cmdline())
            except psutil.NoSuchProcess:
                continue
            found[(conn.laddr.ip, conn.laddr.port)] = cmdline[:150]
    return found


def _is_loopback(ip: str) -> bool:
    address = ipaddress.ip_address(ip)
    mapped = getattr(address, "ipv4_mapped", None)  # ::ffff:127.0.0.1, a dual-stack socket
    return (mapped or address).is_loopback


def _listening_hosts(port: int) -> set[str]:
    return {
        conn.laddr.ip
        for conn in psutil.net_connections(kind="inet")
        if conn.status == psutil.CONN_LISTEN and conn.laddr.port == port
    }


@pytest.mark.slow
@pytest.mark.timeout(900)
def test_local_cluster_token_auth_and_clean_shutdown(tmp_path, s3_bucket, tiny_demo_index):
    import boto3
    import mlflow

    state_dir = tmp_path / "state"
    # Short: Ray's Unix socket paths inside it must stay under 107 bytes.
    ray_temp_dir = tempfile.mkdtemp(prefix="rt-", dir="/tmp")
    ports = {name: free_port() for name in ("RAY", "CLIENT", "DASHBOARD", "MLFLOW")}
    dashboard = f"http://127.0.0.1:{ports['DASHBOARD']}"
    mlflow_uri = f"http://127.0.0.1:{ports['MLFLOW']}"
    artifacts = f"{s3_bucket}/mlflow-{uuid.uuid4().hex[:8]}"
    cluster_env = {
        **os.environ,
        "PATH": f"{VENV_BIN}{os.pathsep}{os.environ['PATH']}",
        "STATE_DIR": str(state_dir),
        "RAY_TEMP_DIR": ray_temp_dir,
        "RAY_PORT": str(ports["RAY"]),
        "RAY_CLIENT_PORT": str(ports["CLIENT"]),
        "DASHBOARD_PORT": str(ports["DASHBOARD"]),
        "MLFLOW_PORT": str(ports["MLFLOW"]),
        "HEAD_CPUS": str(HEAD_CPUS),
        "WORKERS": str(WORKERS),
        "WORKER_CPUS": str(WORKER_CPUS),
        "OBJECT_STORE_MEMORY": str(100 * 1024**2),
        "MLFLOW_ARTIFACTS_DESTINATION": artifacts,
        "STARTUP_TIMEOUT": "180",
    }
    # A client that has none of the cluster's settings, and no ~/.ray/auth_token to fall back on.
    bare_env = {k: v for k, v in cluster_env.items() if not k.startswith("RAY_AUTH")}
    bare_env |= {"HOME": str(tmp_path), "RAY_ADDRESS": dashboard}
    try:
        up = subprocess.run(
            ["bash", str(UP)], env=cluster_env, capture_output=True, text=True, timeout=400
        )
        assert up.returncode == 0, up.stdout + up.stderr
        assert f"RAY_ADDRESS={dashboard} \\" in up.stdout  # it says how to submit

        token_file = state_dir / "auth_token"
        assert stat.S_IMODE(token_file.stat().st_mode) == 0o600
        token = token_file.read_text()
        client_env = bare_env | {"RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN_PATH": str(token_file)}

        # The job server and MLflow listen on the loopback interface only.
        assert _listening_hosts(ports["DASHBOARD"]) == {"127.0.0.1"}
        assert _listening_hosts(ports["MLFLOW"]) == {"127.0.0.1"}
        roots = [int(p.read_text().split()[0]) for p in (state_dir / "pids").glob("*.pid")]
        assert len(roots) == 1 + WORKERS + 1  # head, workers, MLflow

        # The training job, watched while it runs: the sockets of every process of the cluster,
        # Train workers and decode actors included, are sampled until it ends.
        train = f"python jobs/train.py {TRAIN_ARGS} --dataset {tiny_demo_index} "
        train += f"--storage {tmp_path / 'runs'}"
        train_id = f"train-{uuid.uuid4().hex[:8]}"
        job = _submit(
            client_env,
            "--no-wait",
            f"--submission-id={train_id}",
            "--working-dir",
            ".",
            "--",
            *shlex.split(train),
        )
        assert job.returncode == 0, job.stdout[-3000:] + job.stderr[-3000:]
        listening = _listeners(roots)
        while (status := _job_status(dashboard, token, train_id)) in {"PENDING", "RUNNING"}:
            listening |= _listeners(roots)
            time.sleep(1)
        logs = _get_json(f"{dashboard}/api/jobs/{train_id}/logs", token)["logs"]
        assert status == "SUCCEEDED", logs[-3000:]
        check_job(logs, mlflow_uri, tiny_demo_index)

        # One Train worker on each node: the head and the worker node.
        nodes = {node["node_id"] for node in _state(dashboard, token, "nodes")}
        assert len(nodes) == 1 + WORKERS
        train_workers = [
            a for a in _state(dashboard, token, "actors") if a["class_name"] == "RayTrainWorker"
        ]
        assert len(train_workers) == 2, train_workers
        assert {a["node_id"] for a in train_workers} == nodes

        # No port of the cluster is open beyond this machine: not on 0.0.0.0 or ::, nor on any
        # other interface. What was sampled includes Ray's C++ servers and the Train workers.
        # One exception, not Ray's: PyTorch's TCPStore, the DDP rendezvous that rank 0 serves at
        # MASTER_ADDR:MASTER_PORT, listens on all interfaces (torch 2.14 has no setting for its
        # address, and Ray Train's TorchConfig none either).
        exposed = {
            f"{ip}:{port}": cmd for (ip, port), cmd in listening.items() if not _is_loopback(ip)
        }
        tcp_store = {k: cmd for k, cmd in exposed.items() if "ray::RayTrainWorker" in cmd}
        assert len(tcp_store) <= 1, tcp_store
        assert exposed.keys() - tcp_store.keys() == set(), exposed
        ports_seen = {port for _, port in listening}
        assert {ports["RAY"], ports["CLIENT"], ports["DASHBOARD"], ports["MLFLOW"]} <= ports_seen
        commands = " ".join(listening.values())
        for process in (
            "gcs_server",
            "raylet",
            "DashboardAgent",
            "RuntimeEnvAgent",
            "RayTrainWorker",
        ):
            assert process in commands, sorted(listening.values())

        refused = _submit(bare_env, "--", "python", "-c", "print('ran without a token')")
        assert refused.returncode != 0
        assert "Missing authentication token" in refused.stderr
        wrong = _submit(
            bare_env | {"RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN": "0" * 64},
            "--",
            "python",
            "-c",
            "print('ran with a wrong token')",
        )
        assert wrong.returncode != 0
        assert "Invalid authentication token" in wrong.stderr
        with pytest.raises(urllib.error.HTTPError) as no_header:
            urllib.request.urlopen(f"{dashboard}/api/jobs/", timeout=10)
        assert no_header.value.code == 401
        # Only the job with the token ever reached the cluster.
        assert len(_get_json(f"{dashboard}/api/jobs/", token)) == 1

        # MLflow keeps artifacts where MLFLOW_ARTIFACTS_DESTINATION says (S3 here), proxied.
        client = mlflow.MlflowClient(mlflow_uri)  # not the process-wide URI: other tests run here
        run = client.create_run(client.get_experiment_by_name("Default").experiment_id)
        client.log_text(run.info.run_id, "hello", "note.txt")
        bucket, prefix = artifacts.removeprefix("s3://").split("/", 1)
        keys = [
            obj["Key"]
            for obj in boto3.client("s3").list_objects_v2(Bucket=bucket, Prefix=prefix)["Contents"]
        ]
        assert any(key.endswith(f"{run.info.run_id}/artifacts/note.txt") for key in keys), keys

        # A job still running when the cluster goes down must go down with it.
        marker = f"sleeper-{uuid.uuid4().hex[:8]}"
        sleeper = _submit(
            client_env,
            "--no-wait",
            f"--submission-id={marker}",
            "--",
            "python",
            "-c",
            f"import time; time.sleep(600)  # {marker}",
        )
        assert sleeper.returncode == 0, sleeper.stdout + sleeper.stderr
        _wait_running(dashboard, token, marker)
        assert _survivors({}, marker), "the sleeping job's driver should be running"

        tree = _tree(roots)
        assert len(tree) > 10  # GCS, raylets, dashboard, agents, workers, MLflow's children
    finally:
        down = subprocess.run(
            ["bash", str(DOWN)], env=cluster_env, capture_output=True, text=True, timeout=120
        )
    assert down.returncode == 0, down.stdout + down.stderr
    assert _survivors(tree, ray_temp_dir, str(state_dir), marker) == []
    assert not (state_dir / "auth_token").exists()
    shutil.rmtree(ray_temp_dir, ignore_errors=True)


def test_up_refuses_a_port_in_use_and_starts_nothing(tmp_path):
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        env = {
            **os.environ,
            "PATH": f"{VENV_BIN}{os.pathsep}{os.environ['PATH']}",
            "STATE_DIR": str(tmp_path / "state"),
            **{var: str(free_port()) for var in ("RAY_PORT", "RAY_CLIENT_PORT", "MLFLOW_PORT")},
            "DASHBOARD_PORT": str(port),
        }
        up = subprocess.run(["bash", str(UP)], env=env, capture_output=True, text=True, timeout=60)
    assert up.returncode == 1
    assert f"port {port} (DASHBOARD_PORT) is in use" in up.stderr
    assert not (tmp_path / "state" / "pids").exists()
    assert not (tmp_path / "state" / "auth_token").exists()
