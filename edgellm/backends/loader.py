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


MAX_THREADS = 512   # llama.cpp's GGML_MAX_N_THREADS; the C core caps its pool there too


def check_threads(n_threads, what: str = "n_threads") -> None:
    """EdgeLLMError unless n_threads is None or an integer in [1, MAX_THREADS]."""
    if n_threads is None:
        return
    if isinstance(n_threads, bool) or not isinstance(n_threads, int) or not 1 <= n_threads <= MAX_THREADS:
        raise EdgeLLMError(f"{what} must be an integer from 1 to {MAX_THREADS}, got {n_threads!r}")


def create_backend(model, backend: str | None = "auto", n_threads: int | None = None, n_batch: int = 512):
    """Build the backend named `backend` (or $EDGELLM_BACKEND when `auto`) for `model`."""
    name = (backend or "auto").lower()
    if name == "auto":
        name = os.environ.get("EDGELLM_BACKEND", "auto").lower() or "auto"
    if name not in BACKEND_NAMES:
        raise EdgeLLMError(f"unknown backend {backend!r}; expected one of {', '.join(BACKEND_NAMES)}")
    check_threads(n_threads)
    n_threads = n_threads or default_threads()

    reasons = []  # why faster engines were passed over (auto); --verbose and `edgellm info` show them
    if name in ("auto", "native"):
        try:
            from .native import NativeBackend

            return NativeBackend(model, n_threads=n_threads, n_batch=n_batch)
        except (ImportError, NotImplementedError) as e:
            if name == "native":
                raise EdgeLLMError(f"the native backend cannot run this model: {e}") from e
            reasons.append(f"native: {e}")
    if name in ("auto", "numba"):
        try:
            from .numba import NumbaBackend  # imports numba: only reached when it is needed

            backend = NumbaBackend(model, n_threads=n_threads, n_batch=n_batch)
            backend.fallback_reason = "; ".join(reasons) or None
            return backend
        except (ImportError, NotImplementedError) as e:
            if name == "numba":
                raise EdgeLLMError(f"the numba backend cannot run this model: {e}") from e
            reasons.append(f"numba: {e}")
    from .reference import ReferenceBackend

    backend = ReferenceBackend(model, n_threads=n_threads, n_batch=n_batch)
    backend.fallback_reason = "; ".join(reasons) or None
    return backend
