"""What the driver and the Ray workers share: connecting to Ray, environment, paths, crash reports.

All of autorank's Ray code lives in :mod:`autorank.search.executor` (the
executor), :mod:`autorank.search.ray_worker` (what runs on a worker),
:mod:`autorank.search.ray_tune` (the Ray Tune engine) and this module; the rest of
the package runs without Ray.
"""

from __future__ import annotations

import contextlib
import logging
import os
import sys
from typing import Any, Iterator, Optional, Sequence

from autorank.errors import AutorankError

logger = logging.getLogger("autorank")

__all__ = [
    "RayExecutorError", "ray_module", "LOCAL_NODE_IP", "WAIT_S", "check_reachable", "forwarded_env", "driver_paths",
    "absolute_spec", "extend_sys_path", "crash_result", "loopback_node", "local_node_ip", "check_placement",
]

#: node address of the local Ray instance the executor starts; override with $AUTORANK_RAY_NODE_IP.
#: Ray 2.60 binds its gRPC servers (GCS, raylet node manager and object manager, every worker's
#: and the driver's core worker) to loopback only when the node address is a localhost address
#: (127.0.0.1, ::1, localhost), and to every interface (``::``/``0.0.0.0``) otherwise — even for
#: another loopback address such as 127.0.0.2. See :func:`loopback_node`.
LOCAL_NODE_IP = "127.0.0.1"
#: environment variables of the driver forwarded to the workers (prefixes and names)
FORWARD_ENV_PREFIXES = ("AUTORANK_",)
FORWARD_ENV_NAMES = ("OMP_WAIT_POLICY",)
WAIT_S = 0.05


class RayExecutorError(AutorankError, RuntimeError):
    """Ray could not be reached, or the workers could not be started."""


def ray_module():
    """The ``ray`` module, imported with token authentication defaulted on."""
    # Ray 2.60 turns token authentication on for the clusters it starts and reads RAY_AUTH_MODE when
    # it is imported; a process without it cannot start or join such a cluster ("Failed to start
    # GCS", "InvalidAuthToken"). Keep authentication on: default it to token before the import.
    os.environ.setdefault("RAY_AUTH_MODE", "token")
    try:
        import ray
    except ImportError as exc:  # pragma: no cover - ray is a dependency
        raise RayExecutorError("the Ray executor needs ray: pip install 'ray[tune]'") from exc
    return ray


def local_node_ip() -> str:
    """The node address of the local instance: $AUTORANK_RAY_NODE_IP, else :data:`LOCAL_NODE_IP`."""
    return os.environ.get("AUTORANK_RAY_NODE_IP") or LOCAL_NODE_IP


@contextlib.contextmanager
def loopback_node() -> Iterator[None]:
    """While starting a local instance: let a 127.0.0.1 node address stay 127.0.0.1.

    ``ray.init(_node_ip_address="127.0.0.1")`` passes the address through
    ``resolve_ip_for_localhost``, which replaces a localhost address by the machine's
    network address whenever ``ray._private.ray_constants.ENABLE_RAY_CLUSTER`` is true
    (Linux's default; the switch is the ``RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER`` environment
    variable, read when Ray is imported). With the switch off for the duration of
    ``ray.init`` the node keeps 127.0.0.1, so every Ray server of the instance listens on
    loopback only; a cluster the user addresses is not affected. Measured with Ray 2.60:
    GCS, raylet (node manager, object manager), runtime-env agent, workers and the driver
    all listen on 127.0.0.1 (``tests/test_trust.py`` lists their sockets).
    """
    ray_module()
    try:
        from ray._private import ray_constants
    except ImportError:  # pragma: no cover - another Ray layout: the caller checks what it got
        yield
        return
    had = hasattr(ray_constants, "ENABLE_RAY_CLUSTER")
    old = getattr(ray_constants, "ENABLE_RAY_CLUSTER", None)
    ray_constants.ENABLE_RAY_CLUSTER = False
    try:
        yield
    finally:
        if had:
            ray_constants.ENABLE_RAY_CLUSTER = old
        else:  # pragma: no cover
            delattr(ray_constants, "ENABLE_RAY_CLUSTER")


def check_reachable(address: str, timeout: float = 5.0) -> None:
    """Fail in seconds, with the address named, when nothing listens at HOST:PORT (Ray itself retries for minutes)."""
    import socket

    if address in ("auto", "local") or "://" in address:
        return
    host, sep, port = address.rpartition(":")
    if not sep or not port.isdigit():
        raise RayExecutorError(f"Ray address {address!r}: expected auto or HOST:PORT, e.g. 10.0.0.5:6379")
    try:
        with socket.create_connection((host.strip("[]"), int(port)), timeout=timeout):
            pass
    except OSError as exc:
        raise RayExecutorError(f"cannot reach the Ray cluster at {address}: {exc} "
                               "(is `ray start --head` running there, and the port open?)") from None


def forwarded_env() -> dict[str, str]:
    """The driver's environment variables the workers get (AUTORANK_*, OMP_WAIT_POLICY)."""
    return {k: v for k, v in os.environ.items() if k.startswith(FORWARD_ENV_PREFIXES) or k in FORWARD_ENV_NAMES}


def driver_paths() -> list[str]:
    """The driver's project directories (cwd, PYTHONPATH, script dirs), not its installed packages."""
    prefixes = {os.path.realpath(p) for p in (sys.prefix, sys.base_prefix, sys.exec_prefix)}
    out: list[str] = []
    for p in [os.getcwd(), *os.environ.get("PYTHONPATH", "").split(os.pathsep), *sys.path]:
        if not p:
            continue
        p = os.path.realpath(os.path.abspath(p))
        if ("site-packages" in p or "dist-packages" in p or any(p == q or p.startswith(q + os.sep) for q in prefixes)
                or not os.path.isdir(p) or p in out):
            continue
        out.append(p)
    return out


def absolute_spec(spec: str) -> str:
    """A ``file.py:attr`` spec with the file's absolute path (workers run elsewhere)."""
    target, sep, attr = spec.rpartition(":")
    if sep and target.endswith(".py") and os.path.exists(target):
        return f"{os.path.abspath(target)}:{attr}"
    return spec


def extend_sys_path(paths: Sequence[str]) -> None:
    """Make the driver's project directories importable here (specs like ``tests.toys:build``)."""
    for p in paths:
        if p and p not in sys.path and os.path.isdir(p):
            sys.path.append(p)


def crash_result(exc: BaseException, last_where: Optional[dict], attempts: int) -> dict:
    """The error result of a trial whose worker died or raised, as the search records it."""
    ray = ray_module()
    first = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
    if isinstance(exc, ray.exceptions.OutOfMemoryError):
        kind = "OutOfMemory"
    elif isinstance(exc, (ray.exceptions.RayActorError, ray.exceptions.WorkerCrashedError, ray.exceptions.NodeDiedError)):
        kind = "WorkerCrashed"
    elif isinstance(exc, ray.exceptions.RayTaskError):
        cause = getattr(exc, "cause", None) or exc
        kind = type(cause).__name__
        first = (str(cause).strip().splitlines() or [kind])[0]
    else:
        kind = type(exc).__name__
    msg = f"{kind}: the worker failed {attempts} time(s) running this trial; {type(exc).__name__}: {first}"
    out: dict[str, Any] = {"error": msg[:500], "error_type": kind}
    if last_where:
        out["where"] = {k: v for k, v in last_where.items() if k in ("host", "pid", "node_id", "node_ip")}
    return out


def check_placement(need: dict[str, float], what: str) -> None:
    """Fail in one line, naming the resource, when no live node of the cluster offers all of ``need``.

    ``need``: Ray resources (``CPU``, ``GPU``, custom ones such as
    ``accelerator_type:A100``) and amounts; zero amounts are ignored. Nodes an
    autoscaler has not started yet are not seen: on such a cluster start one node
    of the target kind first.
    """
    ray = ray_module()
    need = {k: float(v) for k, v in need.items() if v and v > 0}
    nodes = [n.get("Resources") or {} for n in ray.nodes() if n.get("Alive")]
    if any(all(res.get(k, 0.0) >= v for k, v in need.items()) for res in nodes):
        return
    missing = [k for k, v in need.items() if not any(res.get(k, 0.0) >= v for res in nodes)]
    text = ", ".join(f"{k}={need[k]:g}" for k in (missing or need))
    if missing:
        have = sorted({k for res in nodes for k in res if not k.startswith(("node:", "memory", "object_store_memory"))})
        raise RayExecutorError(f"no node of the Ray cluster has {text} for {what} (the {len(nodes)} node(s) offer: {', '.join(have)})")
    raise RayExecutorError(f"no single node of the Ray cluster has all of {text} for {what}")
