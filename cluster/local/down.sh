#!/usr/bin/env bash
# Stop everything cluster/local/up.sh started, and only that: the processes whose PIDs it
# recorded and all their descendants (Ray's GCS, raylets, dashboard, workers, job drivers,
# MLflow's server workers). Other Ray instances on the machine are left alone, which a bare
# `ray stop` would not do. Keeps the MLflow store, artifacts and logs; removes the token.
#
# Usage:  cluster/local/down.sh   (same STATE_DIR as up.sh; STOP_GRACE seconds, default 30,
#                                  before what is still running gets SIGKILL)
set -uo pipefail

here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
STATE_DIR="${STATE_DIR:-$here/.state}"
STOP_GRACE="${STOP_GRACE:-30}"
pids_dir="$STATE_DIR/pids"

descendants() {
    local child
    for child in $(pgrep -P "$1"); do
        echo "$child"
        descendants "$child"
    done
}

any_alive() {
    local pid
    for pid in "$@"; do kill -0 "$pid" 2>/dev/null && return 0; done
    return 1
}

# The processes up.sh started. A PID file also holds the process's start time: after a reboot
# or a crash the number may name someone else's process, which must not be touched.
roots=""
for pid_file in "$pids_dir"/*.pid; do
    [[ -f "$pid_file" ]] || continue
    { read -r pid; read -r started; } <"$pid_file"
    if [[ "$(ps -o lstart= -p "$pid" 2>/dev/null)" == "$started" ]]; then
        roots="$roots $pid"
    fi
done

if [[ -z "$roots" ]]; then
    echo "down.sh: nothing running from $STATE_DIR"
else
    # Collect descendants while the roots still hold them: once a parent is gone its children
    # are re-parented to init and can no longer be told apart from other processes.
    tree=""
    collect() {
        local root
        for root in $roots; do tree="$tree $(descendants "$root")"; done
    }
    collect
    # SIGTERM lets `ray start --block` stop its node in order, and MLflow shut down cleanly.
    kill -TERM $roots 2>/dev/null
    deadline=$((SECONDS + STOP_GRACE))
    while any_alive $roots && ((SECONDS < deadline)); do
        collect
        sleep 1
    done
    # Whatever outlived its parent (a job driver, a worker) gets a short SIGTERM, then SIGKILL.
    everything="$(echo $roots $tree | tr ' ' '\n' | sort -un)"
    kill -TERM $everything 2>/dev/null
    for _ in 1 2 3 4 5; do
        any_alive $everything || break
        sleep 1
    done
    kill -KILL $everything 2>/dev/null
    echo "down.sh: stopped the cluster's processes:$roots and their descendants"
fi
rm -rf "$pids_dir" "$STATE_DIR/auth_token" "$STATE_DIR/env.sh"
