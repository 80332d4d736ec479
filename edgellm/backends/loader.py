"""Choosing a backend: `auto` takes the fastest engine that can run the model, or the one the user names."""

from __future__ import annotations

import os
import warnings

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


def parse_gpu_layers(value) -> int:
    """-ngl's value: an integer >= 0 (0: CPU only; more than the model's layers: all of them), -1 or "all" (every
    layer), "auto" (-2: as many as fit in the GPU's free memory). EdgeLLMError otherwise."""
    if isinstance(value, str):
        v = value.strip().lower()
        if v == "all":
            return -1
        if v == "auto":
            return -2
        try:
            value = int(v, 10)
        except ValueError:
            raise EdgeLLMError(f"n_gpu_layers must be an integer, \"all\" or \"auto\", got {value!r}") from None
    if isinstance(value, bool) or not isinstance(value, int) or value < -2 or value > 1 << 20:
        raise EdgeLLMError(f"n_gpu_layers must be an integer >= 0, -1 (all), \"all\" or \"auto\", got {value!r}")
    return value


def create_backend(model, backend: str | None = "auto", n_threads: int | None = None, n_batch: int = 512,
                   n_gpu_layers=0, device: int | None = None, output_rows=None):
    """Build the backend named `backend` (or $EDGELLM_BACKEND when `auto`) for `model`. n_gpu_layers != 0: the
    last n_gpu_layers layers and the output on the GPU (`device`, default $EDGELLM_DEVICE or 0), the rest on the
    native core. output_rows: the native core's logits cover only these tokens (a draft's head; its
    `output_rows` says so; other backends give every token's)."""
    n_gpu = parse_gpu_layers(n_gpu_layers)
    if n_gpu != 0:
        check_threads(n_threads)
        try:
            return _gpu_backend(model, n_gpu, n_threads or default_threads(), n_batch, device)
        except GpuUnavailable as e:   # as llama.cpp without GPU support: said, then the CPU runs every layer
            warnings.warn(f"-ngl {n_gpu_layers}: {e}; every layer runs on the CPU", GpuWarning, stacklevel=2)
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

            return NativeBackend(model, n_threads=n_threads, n_batch=n_batch, output_rows=output_rows)
        except (ImportError, NotImplementedError) as e:
            if name == "native":
                raise EdgeLLMError(f"the native backend cannot run this model: {e}") from e
            reasons.append(f"native: {e}")
    if name in ("auto", "numba"):
        try:
            from .numba import NumbaBackend  # imports numba: only reached when it is needed

            _announce_numba_compile(reasons)

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


def gpu_device(device) -> int | None:
    """--device's GPU number (default $EDGELLM_DEVICE; None: the first); EdgeLLMError for anything else."""
    if device is None:
        env = os.environ.get("EDGELLM_DEVICE", "").strip()
        if env:
            try:
                device = int(env)
            except ValueError:
                raise EdgeLLMError(f"EDGELLM_DEVICE must be a GPU number, got {env!r}") from None
    if device is not None and (isinstance(device, bool) or not isinstance(device, int) or device < 0):
        raise EdgeLLMError(f"device must be a GPU number >= 0, got {device!r}")
    return device


def _gpu_backend(model, n_gpu: int, n_threads: int, n_batch: int, device):
    device = gpu_device(device)
    from .cuda.backend import CudaBackend, auto_layers   # imports no CuPy until a backend is made

    try:
        if n_gpu == -2:
            n_gpu = auto_layers(model, device)
            if n_gpu == 0:
                raise GpuUnavailable("not one layer fits in the GPU's free memory")
        return CudaBackend(model, n_gpu_layers=n_gpu, n_threads=n_threads, n_batch=n_batch, device=device)
    except ImportError as e:       # no CuPy, or no usable driver / device / runtime compiler
        raise GpuUnavailable(f"the GPU backend cannot start: {e}") from None
    except NotImplementedError as e:
        raise GpuUnavailable(f"the GPU backend cannot run this model: {e}") from None
    except MemoryError as e:       # CuPy's OutOfMemoryError is one: fewer layers (or -ngl auto) would fit
        raise GpuUnavailable(f"the GPU's memory does not hold {n_gpu if n_gpu > 0 else 'all'} layers ({e}); "
                             f"try fewer, or -ngl auto") from None
    except ValueError as e:        # a GPU number that does not exist: the user's mistake, not the machine's
        raise EdgeLLMError(str(e)) from None


class GpuUnavailable(Exception):
    """Why -ngl cannot use a GPU here (no CuPy, no GPU, a model the kernels do not run): the CPU takes over."""


class GpuWarning(UserWarning):
    """-ngl asked for a GPU that this machine, install or model cannot give: the CPU runs every layer."""


def _numba_cache_is_cold(places=None) -> bool:
    """True when numba has no cached kernels of edgellm's yet (its cache: $NUMBA_CACHE_DIR or the source's
    __pycache__), i.e. the first forward will compile them."""
    from pathlib import Path

    if places is None:
        from .numba import kernels

        places = [Path(kernels.__file__).parent / "__pycache__"]
        if os.environ.get("NUMBA_CACHE_DIR"):
            places.append(Path(os.environ["NUMBA_CACHE_DIR"]))
    for d in places:
        try:
            if any(d.rglob("kernels*.nbi")):
                return False
        except OSError:
            continue
    return True


def _announce_numba_compile(reasons: list[str], places=None) -> None:
    """Say on stderr why the first run pauses: the numba fallback compiles its kernels once (tens of seconds)."""
    import sys

    if _numba_cache_is_cold(places):
        why = f" ({'; '.join(reasons)})" if reasons else ""
        print(f"edgellm: compiling the numba fallback's kernels for this CPU, once (about 10-30 s; later runs load "
              f"them from numba's cache){why}", file=sys.stderr, flush=True)
