"""Beyond one process, on Ray: pipeline stages (`pipeline.py`: a model's layers split over actors, on this or other
hosts) and replicas of the server behind one endpoint (`replicas.py`: Ray Serve, prefix-aware routing).

Ray is an optional extra (`pip install "edgellm[ray]"`); nothing outside this package imports it, and this module
only when asked to.
"""

from __future__ import annotations

import os

from ..errors import EdgeLLMError


def require_ray():
    """The `ray` module, or an EdgeLLMError saying how to install it."""
    try:
        import ray
    except ImportError as e:
        raise EdgeLLMError(f"this needs Ray ({e}): pip install \"edgellm[ray]\"") from None
    return ray


def connect(address: str | None = None, num_cpus: int | None = None):
    """Join the Ray cluster at `address` (or $RAY_ADDRESS), or start one on this machine (loopback only) when
    neither names one; nothing when this process is already connected. Returns the ray module."""
    ray = require_ray()
    if ray.is_initialized():
        return ray
    address = address or os.environ.get("RAY_ADDRESS") or None
    kw = dict(include_dashboard=False, logging_level="WARNING", log_to_driver=False)
    try:
        if address:
            ray.init(address=address, **kw)
        else:
            # Ray starts its workers at nice 15 (a driver stays responsive); here the workers (replicas, stages)
            # are the work, and must not yield to every other process on the machine
            os.environ.setdefault("RAY_worker_niceness", "0")
            ray.init(num_cpus=num_cpus, _node_ip_address="127.0.0.1", **kw)
    except Exception as e:   # no cluster there, a version mismatch, no room for a local one
        where = f"the Ray cluster at {address}" if address else "a local Ray cluster"
        raise EdgeLLMError(f"cannot connect to {where}: {e}") from None
    return ray


def rss_bytes() -> int:
    """This process's resident set (Linux /proc; 0 elsewhere)."""
    try:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except (OSError, ValueError, IndexError):
        return 0
