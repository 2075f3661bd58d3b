"""`ray start` for a worker node of a loopback-only cluster: `python ray_start_loopback.py start
--address=127.0.0.1:PORT --node-ip-address=127.0.0.1 ...` (same arguments as `ray start`).

Ray 2.60's C++ gRPC servers (GCS, raylet, object manager, every worker's core worker) listen on
127.0.0.1 only when the node's address is exactly 127.0.0.1, and on all interfaces otherwise;
the dashboard agent's gRPC server does the same. On Linux, `ray start` replaces a loopback
--node-ip-address (and a loopback --address) with the machine's outward address, unless
RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0 — which up.sh sets, and which also keeps job drivers on
loopback — but with that setting `ray start` refuses to start a worker node at all. This wrapper
lets a worker node join with that setting and keep the loopback address it is given. The head
needs no wrapper: plain `ray start --head` keeps 127.0.0.1 under the same setting.

Checked against ray==2.60.0 (the pin in pyproject.toml): both names are private to Ray.
"""

from __future__ import annotations

import sys

from ray._private import ray_constants, services


def _keep(host: str) -> str:
    return host


# The multi-node check in `ray start` reads this flag; the processes the node starts (raylet,
# agents, workers) read RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0 from the environment themselves.
ray_constants.ENABLE_RAY_CLUSTER = True
services.resolve_ip_for_localhost = _keep

from ray.scripts.scripts import main  # noqa: E402  (after the patches, which it reads)

if __name__ == "__main__":
    sys.exit(main())
