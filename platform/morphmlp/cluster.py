"""Connecting to Ray: the one door every job goes through.

`connect_ray` joins the cluster at the given address (or RAY_ADDRESS, which `ray job submit` sets
for its entrypoints) and starts a local Ray when neither is given. An unreachable address fails
in seconds with one line, where `ray.init` would retry for minutes. `ray_session` does the same
for a block and disconnects after it if it connected (jobs that are also called as functions).
"""

from __future__ import annotations

import contextlib
import logging
import os
import socket
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass

from morphmlp.errors import MorphMLPError

log = logging.getLogger("morphmlp.cluster")


class ClusterError(MorphMLPError):
    """The Ray cluster can't be reached."""


class UnmeetableRequestError(MorphMLPError):
    """The job asks for more than the cluster has, and no autoscaler will add it in time."""


def connect_ray(address: str | None = None) -> None:
    import ray

    if ray.is_initialized():
        return
    target = address or os.environ.get("RAY_ADDRESS")
    _check_reachable(target)
    try:
        ray.init(address=target, logging_level=logging.WARNING)
    except (ConnectionError, RuntimeError, ValueError) as err:
        raise ClusterError(f"can't connect to the Ray cluster at {target}: {err}") from err


@contextlib.contextmanager
def ray_session(address: str | None = None) -> Iterator[None]:
    """connect_ray for the block; ray.shutdown() after it, unless Ray was already connected."""
    import ray

    started = not ray.is_initialized()
    connect_ray(address)
    try:
        yield
    finally:
        if started:
            ray.shutdown()


def _check_reachable(address: str | None) -> None:
    """A TCP probe of host:port answers in seconds (ray.init retries an unreachable GCS)."""
    if not address or address == "auto" or "://" in address:
        return
    host, _, port = address.rpartition(":")
    try:
        socket.create_connection((host, int(port)), timeout=5).close()
    except (OSError, ValueError) as err:
        raise ClusterError(f"can't connect to the Ray cluster at {address}: {err}") from err


@dataclass(frozen=True)
class Demand:
    """`count` actors of one kind, each needing `resources` on a single node."""

    what: str  # "training worker", "decode actor"
    count: int
    resources: dict[str, float]


def check_resources(
    demands: Sequence[Demand],
    *,
    wait_s: float,
    nodes: Callable[[], list[dict[str, float]]] | None = None,
    autoscaler: Callable[[], bool] | None = None,
    poll_s: float = 10.0,
) -> None:
    """Refuse, before any worker starts, a job that the cluster can never run.

    Ray retries a worker group it can't place without limit (a CPU-only cluster asked for GPUs
    waits forever). Without an autoscaler, a shortfall raises at once, naming it. With one, this
    waits up to `wait_s` for nodes to arrive, with a line every `poll_s`, then raises.
    `nodes` and `autoscaler` default to the connected cluster's.
    """
    nodes = nodes or _alive_nodes
    autoscaler = autoscaler or _has_autoscaler
    deadline = time.monotonic() + wait_s
    while True:
        shortfall = _shortfall(demands, nodes())
        if shortfall is None:
            return
        if not autoscaler():
            raise UnmeetableRequestError(f"{shortfall}, and the cluster has no autoscaler")
        left = deadline - time.monotonic()
        if left <= 0:
            raise UnmeetableRequestError(
                f"{shortfall}; the autoscaler added nothing that fits in {wait_s:.0f} s "
                "(scaling.resource_wait_s)"
            )
        log.info("waiting for the autoscaler: %s (%.0f s left)", shortfall, left)
        time.sleep(min(poll_s, left))


def _shortfall(demands: Sequence[Demand], nodes: list[dict[str, float]]) -> str | None:
    """First-fit of every actor onto the nodes' total resources: what does not fit, or None."""
    free = [dict(n) for n in nodes]
    total = _sum(nodes)
    for demand in sorted(demands, key=lambda d: -sum(d.resources.values())):
        for placed in range(demand.count):
            node = next((n for n in free if _fits(demand.resources, n)), None)
            if node is None:
                need = _sum([demand.resources] * demand.count)
                return (
                    f"{demand.count} {demand.what}(s) need {_fmt(demand.resources)} each "
                    f"({_fmt(need)} in all); only {placed} fit next to the rest of the job on a "
                    f"cluster of {len(nodes)} node(s) with {_fmt(total)} in total"
                )
            for key, amount in demand.resources.items():
                node[key] -= amount
    return None


def _fits(need: dict[str, float], node: dict[str, float]) -> bool:
    return all(node.get(key, 0.0) + 1e-9 >= amount for key, amount in need.items() if amount > 0)


def _sum(resources: list[dict[str, float]]) -> dict[str, float]:
    total: dict[str, float] = {}
    for r in resources:
        for key, amount in r.items():
            total[key] = total.get(key, 0.0) + amount
    return total


def _fmt(resources: dict[str, float]) -> str:
    shown = {k: v for k, v in resources.items() if v > 0}
    return ", ".join(f"{v:g} {k}" for k, v in sorted(shown.items())) or "nothing"


def _alive_nodes() -> list[dict[str, float]]:
    import ray

    return [
        {k: float(v) for k, v in node["Resources"].items() if not k.startswith("node:")}
        for node in ray.nodes()
        if node.get("Alive")
    ]


def _has_autoscaler() -> bool:
    """Whether an autoscaler that can add nodes watches this cluster.

    Every Ray head runs a monitor that writes a status into the GCS, a plain `ray start` or
    `ray.init` cluster included; there each node's type is just its own id ("node_<id>"). The
    launcher's and KubeRay's autoscalers map nodes to the node types of their config (and the v2
    autoscaler reports itself as not legacy).
    """
    import json

    from ray._private.ray_constants import DEBUG_AUTOSCALING_STATUS
    from ray.experimental.internal_kv import _internal_kv_get

    raw = _internal_kv_get(DEBUG_AUTOSCALING_STATUS)
    if not raw:
        return False
    report = json.loads(raw).get("autoscaler_report") or {}
    if (
        report.get("legacy") is False
        or report.get("pending_launches")
        or report.get("pending_nodes")
    ):
        return True
    types = (report.get("node_type_mapping") or {}).values()
    return any(not str(t).startswith("node_") for t in types)
