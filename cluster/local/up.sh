#!/usr/bin/env bash
# Bring up, on this machine, the same shape of cluster the project runs on in the cloud:
# a Ray head, extra Ray worker nodes with their own resources (the CPU "decode" nodes),
# and an MLflow tracking server. Token auth is on, the dashboard/job server and MLflow listen on
# 127.0.0.1, and every Ray endpoint (GCS, raylets, object managers, agents, workers, the Ray
# client server) on NODE_IP, 127.0.0.1 by default: nothing here is reachable from the network,
# least of all an open job server (CVE-2023-48022). One exception, not Ray's: the rendezvous
# store PyTorch opens on a multi-worker training job's rank 0 (torch.distributed's TCPStore at
# MASTER_ADDR:MASTER_PORT) listens on all interfaces while the job runs; torch has no setting
# for its address.
#
# Usage:  source .venv/bin/activate && cluster/local/up.sh      (stop with cluster/local/down.sh)
#
# Settings (environment variables; the defaults are Ray's and MLflow's usual ports):
#   STATE_DIR        where token, PIDs, logs, env.sh and the MLflow store live
#                    (default: cluster/local/.state, git-ignored)
#   NODE_IP          the address every Ray node and its servers bind to and advertise
#                    (127.0.0.1). Another address of this machine lets other machines reach the
#                    cluster; Ray 2.60 then binds its C++ gRPC servers (GCS, raylets, object
#                    managers, workers' core workers) and the dashboard agent's gRPC server to
#                    all interfaces, as it has no setting for their address: up.sh warns.
#   RAY_TEMP_DIR     Ray's temp/session dir (default: /tmp/ray-morphmlp-$USER; kept short
#                    because Ray's Unix socket paths inside it must stay under 107 bytes)
#   RAY_PORT         GCS port of the head (6379)
#   RAY_CLIENT_PORT  Ray client server port of the head (10001)
#   DASHBOARD_PORT   dashboard + job server (8265)
#   MLFLOW_PORT      MLflow tracking server (5000)
#   HEAD_CPUS        CPUs of the head node, which runs job drivers and Train workers (2)
#   HEAD_GPUS        GPUs of the head node (unset: Ray detects them)
#   WORKERS          number of extra worker nodes (1)
#   WORKER_CPUS      CPUs of each worker node (2)
#   WORKER_RESOURCES custom resources of each worker node (default: {"decode": WORKER_CPUS},
#                    so Ray Data decode actors that ask for "decode" land on these nodes)
#   OBJECT_STORE_MEMORY  object store bytes per node (unset: Ray's default, 30% of RAM per node)
#   MLFLOW_ARTIFACTS_DESTINATION  where the MLflow server stores artifacts: a folder or an
#                    s3:// URI (default: $STATE_DIR/mlartifacts). For S3 the server reads the
#                    usual AWS_* variables (AWS_ENDPOINT_URL_S3 for an S3-compatible store).
#   STARTUP_TIMEOUT  seconds to wait for each component to come up (120)
set -euo pipefail

here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
STATE_DIR="${STATE_DIR:-$here/.state}"
mkdir -p "$STATE_DIR"
STATE_DIR="$(cd "$STATE_DIR" && pwd)" # absolute: it goes into env.sh and MLflow's SQLite URI
NODE_IP="${NODE_IP:-127.0.0.1}"
RAY_TEMP_DIR="${RAY_TEMP_DIR:-/tmp/ray-morphmlp-${USER:-$(id -u)}}"
RAY_PORT="${RAY_PORT:-6379}"
RAY_CLIENT_PORT="${RAY_CLIENT_PORT:-10001}"
DASHBOARD_PORT="${DASHBOARD_PORT:-8265}"
MLFLOW_PORT="${MLFLOW_PORT:-5000}"
HEAD_CPUS="${HEAD_CPUS:-2}"
WORKERS="${WORKERS:-1}"
WORKER_CPUS="${WORKER_CPUS:-2}"
[[ -n "${WORKER_RESOURCES:-}" ]] || WORKER_RESOURCES="{\"decode\": $WORKER_CPUS}"
MLFLOW_ARTIFACTS_DESTINATION="${MLFLOW_ARTIFACTS_DESTINATION:-$STATE_DIR/mlartifacts}"
STARTUP_TIMEOUT="${STARTUP_TIMEOUT:-120}"

pids_dir="$STATE_DIR/pids"
logs_dir="$STATE_DIR/logs"
token_file="$STATE_DIR/auth_token"
dashboard_url="http://127.0.0.1:$DASHBOARD_PORT"
mlflow_url="http://127.0.0.1:$MLFLOW_PORT"

fail() {
    echo "up.sh: $1" >&2
    if [[ -n "${2:-}" && -f "$2" ]]; then
        echo "--- last lines of $2 ---" >&2
        tail -n 30 "$2" >&2
    fi
    # Leave nothing half-started behind.
    STATE_DIR="$STATE_DIR" "$here/down.sh" >&2 || true
    exit 1
}

# Job drivers run `python` from the nodes' PATH: it must be the project's environment.
if ! command -v curl >/dev/null || ! python -c 'import ray, mlflow' 2>/dev/null; then
    echo "up.sh: needs curl, and the project's Python on PATH (python with ray and mlflow):" \
        "activate the project venv first: source .venv/bin/activate" >&2
    exit 1
fi
for port_var in RAY_PORT RAY_CLIENT_PORT DASHBOARD_PORT MLFLOW_PORT; do
    if (exec 3<>"/dev/tcp/127.0.0.1/${!port_var}") 2>/dev/null ||
        (exec 3<>"/dev/tcp/$NODE_IP/${!port_var}") 2>/dev/null; then
        echo "up.sh: port ${!port_var} ($port_var) is in use on this machine; set $port_var" \
            "to a free port" >&2
        exit 1
    fi
done
if [[ -d "$pids_dir" ]]; then
    echo "up.sh: a cluster from $STATE_DIR may be running ($pids_dir exists); run" \
        "$here/down.sh first (it also cleans up after a crash or reboot)" >&2
    exit 1
fi
mkdir -p "$pids_dir" "$logs_dir" "$RAY_TEMP_DIR"

# A fresh 256-bit token per cluster, readable by this user only. Every node, job driver and
# client finds it through RAY_AUTH_TOKEN_PATH; with RAY_AUTH_MODE=token, Ray refuses HTTP and
# gRPC requests that don't carry it.
(umask 077 && python -c 'import secrets; print(secrets.token_hex(32), end="")' >"$token_file")
export RAY_AUTH_MODE=token RAY_AUTH_TOKEN_PATH="$token_file"
# Job drivers and Train workers inherit the nodes' environment: this is how they find MLflow.
export MLFLOW_TRACKING_URI="$mlflow_url"
# On SIGTERM a node first drains (up to 30 s) so that serving traffic can move elsewhere;
# a one-machine cluster has nowhere to move it, so down.sh should not wait for that.
export RAY_GRACEFUL_SHUTDOWN_DRAIN_TIMEOUT_S=0
# Ray 2.60 binds its C++ gRPC servers to 127.0.0.1 only if that is the node's address; on Linux
# `ray start` and `ray.init` swap a loopback address for the machine's outward one unless this is
# 0 (also for job drivers, which inherit it). With it 0, `ray start` refuses worker nodes: they
# start through ray_start_loopback.py, which keeps their loopback address (see there).
if [[ "$NODE_IP" == "127.0.0.1" ]]; then
    export RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0
    start_worker_node=(python "$here/ray_start_loopback.py" start)
else
    start_worker_node=(ray start)
    echo "up.sh: NODE_IP=$NODE_IP: Ray 2.60 binds the GCS, raylets, object managers, workers and" \
        "the dashboard agent's gRPC server to all interfaces of this machine (it has no setting" \
        "for their address); only token auth stands between them and the network" >&2
fi

# Start one detached process and record its PID and start time: down.sh stops it and its
# descendants, and the start time tells it whether the PID still names the same process.
launch() {
    local name="$1"
    shift
    nohup "$@" >"$logs_dir/$name.log" 2>&1 &
    printf '%s\n%s\n' $! "$(ps -o lstart= -p $!)" >"$pids_dir/$name.pid"
}

# Wait until the command "$2..." succeeds, failing early if the process "$1" dies.
wait_for() {
    local name="$1" deadline=$((SECONDS + STARTUP_TIMEOUT))
    shift
    until "$@" >/dev/null 2>&1; do
        kill -0 "$(head -n 1 "$pids_dir/$name.pid")" 2>/dev/null ||
            fail "$name exited" "$logs_dir/$name.log"
        ((SECONDS < deadline)) ||
            fail "$name not up after ${STARTUP_TIMEOUT}s" "$logs_dir/$name.log"
        sleep 1
    done
}

# Each node runs `ray start --block` so that it stays our child process: down.sh can then stop
# exactly the processes this script started, never other Ray instances on the machine (which
# is what a bare `ray stop` would do). The agents' ports and worker ports are left to Ray
# (0 = any free port) so that several nodes, and other Ray instances, share one machine; every
# one of them binds to --node-ip-address (the dashboard agent's HTTP server also to 127.0.0.1).
common_node_args=(
    --block --disable-usage-stats --node-ip-address="$NODE_IP"
    --dashboard-agent-listen-port=0 --min-worker-port=0 --max-worker-port=0
    ${OBJECT_STORE_MEMORY:+--object-store-memory="$OBJECT_STORE_MEMORY"}
)

launch ray-head ray start --head "${common_node_args[@]}" --temp-dir="$RAY_TEMP_DIR" \
    --port="$RAY_PORT" --ray-client-server-port="$RAY_CLIENT_PORT" \
    --num-cpus="$HEAD_CPUS" ${HEAD_GPUS:+--num-gpus="$HEAD_GPUS"} \
    --include-dashboard=true --dashboard-host=127.0.0.1 --dashboard-port="$DASHBOARD_PORT"
# The job server is a dashboard module: ready when an authenticated job listing answers.
# The header goes through stdin so the token never shows in the process list.
job_server_ready() {
    curl -sf -H @- "$dashboard_url/api/jobs/" <<<"Authorization: Bearer $(cat "$token_file")"
}
wait_for ray-head job_server_ready

# One node at a time: nodes starting together on one machine race for the same socket names
# in the shared session directory.
for i in $(seq 1 "$WORKERS"); do
    # --num-gpus=0: worker nodes share this machine's GPUs with the head; counting them
    # again on every node would let Ray schedule more GPU work than there is hardware.
    # A temp dir of its own: nodes that share one share runtime_resources/, and a node's agent
    # unpacking a job's working_dir replaces the folder that a driver on another node runs in.
    launch "ray-worker-$i" "${start_worker_node[@]}" --address="$NODE_IP:$RAY_PORT" \
        "${common_node_args[@]}" --temp-dir="$RAY_TEMP_DIR/w$i" \
        --num-cpus="$WORKER_CPUS" --num-gpus=0 --resources="$WORKER_RESOURCES"
    wait_for "ray-worker-$i" grep -q 'Ray runtime started' "$logs_dir/ray-worker-$i.log"
done

# MLflow: SQLite for runs and the model registry; artifacts proxied by the server
# (--serve-artifacts is MLflow's default), so clients need no storage credentials.
launch mlflow mlflow server --host 127.0.0.1 --port "$MLFLOW_PORT" --workers 1 \
    --backend-store-uri "sqlite:///$STATE_DIR/mlflow.db" \
    --artifacts-destination "$MLFLOW_ARTIFACTS_DESTINATION"
wait_for mlflow curl -sf "$mlflow_url/health"

cat >"$STATE_DIR/env.sh" <<EOF
# Written by cluster/local/up.sh: the client settings for the local cluster.
export RAY_AUTH_MODE=token
export RAY_AUTH_TOKEN_PATH='$token_file'
${RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER:+export RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0  # ray.init/ray status keep 127.0.0.1}
export RAY_API_SERVER_ADDRESS='$dashboard_url'
export MLFLOW_TRACKING_URI='$mlflow_url'
EOF

stop="$here/down.sh"
[[ "$STATE_DIR" == "$here/.state" ]] || stop="STATE_DIR=$STATE_DIR $stop"
cat <<EOF
Local cluster is up: a head node ($HEAD_CPUS CPUs) and $WORKERS worker node(s)
  ($WORKER_CPUS CPUs and $WORKER_RESOURCES each), every Ray endpoint on $NODE_IP.
  Dashboard / job server  $dashboard_url   (token auth on; the dashboard asks for the token)
  MLflow                  $mlflow_url   (artifacts: $MLFLOW_ARTIFACTS_DESTINATION)
  Token                   $token_file   (mode 0600)
  Logs                    $logs_dir, Ray sessions in $RAY_TEMP_DIR

Submit a job from the repository root:
  source $STATE_DIR/env.sh
  ray job submit --working-dir . -- python jobs/train.py --variant xs
or in one line:
  RAY_AUTH_MODE=token RAY_AUTH_TOKEN_PATH=$token_file RAY_ADDRESS=$dashboard_url \\
    ray job submit --working-dir . -- python jobs/train.py --variant xs
Cluster status:
  source $STATE_DIR/env.sh && ray status --address $NODE_IP:$RAY_PORT
Stop everything: $stop
EOF
