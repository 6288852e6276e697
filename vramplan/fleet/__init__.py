"""Running fleet plans on Ray: Serve deployments (:mod:`.serve`) and batch jobs (:mod:`.batch`).

Ray is an optional extra (``pip install 'vramplan[fleet]'``); the planner never needs it.
"""

from __future__ import annotations

import os
import socket

from ..planner.errors import VramplanError

INSTALL_HINT = "Ray is not installed: pip install 'vramplan[fleet]'"
NAMESPACE = "vramplan"


class RayNotAvailableError(VramplanError, ImportError):
    """Ray (the ``fleet`` extra) is missing, or no Ray cluster can be reached."""


def require_ray():
    """The ``ray`` module, or one line saying how to install the extra."""
    try:
        import ray
    except ImportError as err:
        raise RayNotAvailableError(INSTALL_HINT) from err
    return ray


def connect(address: str | None = None, **init_kwargs):
    """Join the Ray cluster at ``address`` (or RAY_ADDRESS), or start a local one when neither is given."""
    ray = require_ray()
    if ray.is_initialized():
        return ray
    address = address or os.environ.get("RAY_ADDRESS")
    if address and address != "auto":
        _reachable(address)
    try:
        ray.init(address=address, namespace=NAMESPACE, log_to_driver=False, **init_kwargs)
    except (ConnectionError, TimeoutError, RuntimeError) as err:
        where = address or "a new local cluster"
        raise RayNotAvailableError(
            f"cannot reach a Ray cluster at {where} ({type(err).__name__}: {err}). Start one (`ray start --head`), "
            f"pass --address host:6379 (or set RAY_ADDRESS), or leave the address out to run locally."
        ) from err
    return ray


def _reachable(address: str, timeout: float = 3.0) -> None:
    """Fail fast with a clear message: Ray itself waits a minute, then may abort the process."""
    hostport = address.split("://", 1)[-1]
    host, _, port = hostport.rpartition(":")
    try:
        with socket.create_connection((host or "127.0.0.1", int(port)), timeout=timeout):
            return
    except (OSError, ValueError) as err:
        raise RayNotAvailableError(
            f"no Ray cluster reachable at {address} ({err}). Start one (`ray start --head`), check --address "
            f"(host:port of the head node, default port 6379), or leave it out to start a local cluster."
        ) from err
