"""Connecting to Ray: the one door every job goes through.

`connect_ray` joins the cluster at the given address (or RAY_ADDRESS, which `ray job submit` sets
for its entrypoints) and starts a local Ray when neither is given. An unreachable address fails
in seconds with one line, where `ray.init` would retry for minutes.
"""

from __future__ import annotations

import logging
import os
import socket

from morphmlp.errors import MorphMLPError


class ClusterError(MorphMLPError):
    """The Ray cluster can't be reached, or can't run what the job asks for."""


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


def _check_reachable(address: str | None) -> None:
    """A TCP probe of host:port answers in seconds (ray.init retries an unreachable GCS)."""
    if not address or address == "auto" or "://" in address:
        return
    host, _, port = address.rpartition(":")
    try:
        socket.create_connection((host, int(port)), timeout=5).close()
    except (OSError, ValueError) as err:
        raise ClusterError(f"can't connect to the Ray cluster at {address}: {err}") from err
