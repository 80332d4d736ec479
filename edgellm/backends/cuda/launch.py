"""Kernel launches for the GPU backend: through CuPy, or with programmatic dependent launch (PDL).

A decode step is ~150 small kernels replayed as one CUDA graph; between two of them the GPU drains the first and
starts the second, a few microseconds each time. With PDL (Hopper and later) a kernel is launched while the one
before it finishes: its blocks load their weights, then wait in `pdl_entry()` (kernels.cu) until the previous
kernel's writes are visible. CuPy's launch takes no launch attributes, so those launches go through the driver's
cuLaunchKernelEx (libcuda, which every CUDA install has) with ctypes. They are used only while a graph is captured:
a replay costs nothing in Python, and prefill steps (no graph) keep CuPy's faster launch path.

Not yet measured on the GPU machine (no machine could be had when it was written), so off unless
EDGELLM_GPU_PDL=1."""

from __future__ import annotations

import ctypes
import os

import numpy as np

_PROGRAMMATIC_STREAM_SERIALIZATION = 6   # CU_LAUNCH_ATTRIBUTE_PROGRAMMATIC_STREAM_SERIALIZATION


class _Attr(ctypes.Structure):   # CUlaunchAttribute: an id, padding to 8 bytes, a 64-byte value union
    _fields_ = [("id", ctypes.c_int), ("pad", ctypes.c_int), ("value", ctypes.c_int), ("pad2", ctypes.c_int),
                ("rest", ctypes.c_uint64 * 7)]


class _Config(ctypes.Structure):   # CUlaunchConfig
    _fields_ = [("grid_x", ctypes.c_uint), ("grid_y", ctypes.c_uint), ("grid_z", ctypes.c_uint),
                ("block_x", ctypes.c_uint), ("block_y", ctypes.c_uint), ("block_z", ctypes.c_uint),
                ("shared_mem", ctypes.c_uint), ("stream", ctypes.c_void_p), ("attrs", ctypes.POINTER(_Attr)),
                ("n_attrs", ctypes.c_uint)]


def _driver_launch():
    """libcuda's cuLaunchKernelEx, or None (no driver library, or one older than CUDA 12)."""
    try:
        lib = ctypes.CDLL("libcuda.so.1")
        fn = lib.cuLaunchKernelEx
    except (OSError, AttributeError):
        return None
    fn.argtypes = [ctypes.POINTER(_Config), ctypes.c_void_p, ctypes.POINTER(ctypes.c_void_p), ctypes.c_void_p]
    fn.restype = ctypes.c_int
    return fn


_SCALARS = {np.dtype(np.int32): ctypes.c_int32, np.dtype(np.int64): ctypes.c_int64,
            np.dtype(np.float32): ctypes.c_float, np.dtype(np.uint64): ctypes.c_uint64}


def _arg(a):
    """A kernel argument as the ctypes value CuPy would pass: numpy scalars by value, device arrays by address."""
    if isinstance(a, np.generic):
        t = _SCALARS.get(a.dtype)
        if t is None:
            raise TypeError(f"kernel argument of type {a.dtype} (give int32, int64, float32 or an address)")
        return t(a.item())
    ptr = getattr(getattr(a, "data", None), "ptr", None)   # a CuPy array
    if ptr is None:
        raise TypeError(f"kernel argument {type(a).__name__} (give numpy scalars or CuPy arrays)")
    return ctypes.c_void_p(ptr)


class Launcher:
    """Launches a module's kernels in stream order. `chain()` opens a run of launches (a graph being captured)
    in which every kernel after the first waits for the one before through PDL; `unchain()` closes it."""

    def __init__(self, compute_capability: int, hip: bool = False):
        self._ex = None
        if compute_capability >= 90 and not hip and os.environ.get("EDGELLM_GPU_PDL", "0") == "1":
            self._ex = _driver_launch()
        self._attr = _Attr(id=_PROGRAMMATIC_STREAM_SERIALIZATION, value=1)
        self._on = False
        self._after_kernel = False

    @property
    def available(self) -> bool:
        return self._ex is not None

    def chain(self) -> None:
        self._on, self._after_kernel = self._ex is not None, False

    def unchain(self) -> None:
        self._on = self._after_kernel = False

    def wrap(self, fn) -> "Kernel":
        return Kernel(fn, self)

    def launch(self, fn, grid, block, args, shared_mem: int, stream) -> None:
        if not (self._on and self._after_kernel) or stream is None:
            fn(grid, block, args, shared_mem=shared_mem, stream=stream)
            self._after_kernel = self._on
            return
        grid, block = tuple(grid) + (1,) * (3 - len(grid)), tuple(block) + (1,) * (3 - len(block))
        cfg = _Config(grid[0], grid[1], grid[2], block[0], block[1], block[2], int(shared_mem),
                      ctypes.c_void_p(stream.ptr if stream is not None else 0), ctypes.pointer(self._attr), 1)
        vals = [_arg(a) for a in args]
        params = (ctypes.c_void_p * len(vals))(*[ctypes.addressof(v) for v in vals])
        err = self._ex(ctypes.byref(cfg), ctypes.c_void_p(fn.ptr), params, None)
        if err != 0:
            raise RuntimeError(f"cuLaunchKernelEx failed with CUDA error {err}")


class Kernel:
    """A compiled kernel, called as CuPy's are: kernel(grid, block, args, shared_mem=0, stream=None)."""

    def __init__(self, fn, launcher: Launcher):
        self.fn, self.launcher = fn, launcher

    def __call__(self, grid, block, args, shared_mem: int = 0, stream=None) -> None:
        self.launcher.launch(self.fn, grid, block, args, shared_mem, stream)

    def __getattr__(self, name):   # the CuPy function's attributes (max_dynamic_shared_size_bytes, ...)
        if name == "fn":   # not set yet (an instance made without __init__): no recursion
            raise AttributeError(name)
        return getattr(self.fn, name)
