"""Choosing a backend: `auto` takes the fastest engine that can run the model, or the one the user names."""

from __future__ import annotations

import os

from ..errors import EdgeLLMError

BACKEND_NAMES = ("auto", "native", "numba", "reference")


def default_threads() -> int:
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except AttributeError:  # not Linux
        return max(1, os.cpu_count() or 1)


def create_backend(model, backend: str | None = "auto", n_threads: int | None = None):
    """Build the backend named `backend` (or $EDGELLM_BACKEND when `auto`) for `model`."""
    name = (backend or "auto").lower()
    if name == "auto":
        name = os.environ.get("EDGELLM_BACKEND", "auto").lower() or "auto"
    if name not in BACKEND_NAMES:
        raise EdgeLLMError(f"unknown backend {backend!r}; expected one of {', '.join(BACKEND_NAMES)}")
    if n_threads is not None and n_threads < 1:
        raise EdgeLLMError(f"n_threads must be at least 1, got {n_threads}")
    n_threads = n_threads or default_threads()

    fallback_reason = None
    if name in ("auto", "native"):
        try:
            from .native import NativeBackend
            return NativeBackend(model, n_threads=n_threads)
        except (ImportError, NotImplementedError) as e:
            if name == "native":
                raise EdgeLLMError(f"the native backend cannot run this model: {e}") from e
            # auto: fall back quietly; `--verbose` and `edgellm info` say which backend runs and why
            fallback_reason = f"native backend unavailable: {e}"
    if name == "numba":
        raise EdgeLLMError("the numba backend is not available in this build")
    from .reference import ReferenceBackend
    backend = ReferenceBackend(model, n_threads=n_threads)
    backend.fallback_reason = fallback_reason
    return backend
