"""Memory that costs only what is used: lazily zeroed arrays, pages given back, pages locked.

A small board has no room for memory a run never reads. Tools for the loaders and the KV pool:
`lazy_zeros` (an array on fresh anonymous pages in 4 KiB units, so a KV pool sized for the whole budget costs only
the blocks written; numpy asks for 2 MiB transparent huge pages on large arrays, which makes one written row cost
2 MiB), `release` (give a range of a mapping back to the kernel: file pages are read again on the next touch,
anonymous ones come back as zeros), `lock` (mlock, as llama.cpp's --mlock) and `fixed_trim_threshold` (glibc
gives freed heap memory back at once instead of keeping MBs of freed temporaries, such as a vocabulary's worth of
sampling arrays, after its dynamic threshold has grown) and, since freed memory goes back at once, `RowBuffers`
(the few arrays a step's logits and a sampler's copy of them go into, kept and reused instead of being mapped
afresh every step).
"""

from __future__ import annotations

import ctypes
import mmap
import os
import sys

import numpy as np

PAGE = mmap.PAGESIZE


def lazy_zeros(shape, dtype) -> np.ndarray:
    """np.zeros on an anonymous mapping of its own, in small pages: nothing is resident until written."""
    dtype = np.dtype(dtype)
    nbytes = int(np.prod(shape, dtype=np.int64)) * dtype.itemsize
    if nbytes == 0:
        return np.zeros(shape, dtype)
    mm = mmap.mmap(-1, nbytes, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
    if hasattr(mmap, "MADV_NOHUGEPAGE"):
        try:
            mm.madvise(mmap.MADV_NOHUGEPAGE)
        except OSError:   # a kernel without transparent huge pages: small pages already
            pass
    return np.frombuffer(mm, dtype=dtype).reshape(shape)   # the array keeps the mapping alive


def release(mm: mmap.mmap, offset: int, nbytes: int) -> int:
    """Drop the whole pages inside [offset, offset + nbytes) of a mapping from this process's memory (MADV_DONTNEED).
    A file mapping reads them back on the next touch; an anonymous one gives zeros: release only what nothing reads
    again. Returns the bytes released (0 where madvise is missing)."""
    start = -(-offset // PAGE) * PAGE
    end = (offset + nbytes) // PAGE * PAGE
    if end <= start or not hasattr(mm, "madvise") or not hasattr(mmap, "MADV_DONTNEED"):
        return 0
    mm.madvise(mmap.MADV_DONTNEED, start, end - start)
    return end - start


def lock(address: int, nbytes: int) -> None:
    """mlock [address, address + nbytes): resident now and never swapped out. OSError (with errno) when refused,
    most often RLIMIT_MEMLOCK (`ulimit -l`)."""
    libc = ctypes.CDLL(None, use_errno=True)
    start = address // PAGE * PAGE
    if libc.mlock(ctypes.c_void_p(start), ctypes.c_size_t(address + nbytes - start)) != 0:
        err = ctypes.get_errno()
        raise OSError(err, os.strerror(err))


_M_TRIM_THRESHOLD = -1   # glibc's malloc.h
_trim_set = False


def fixed_trim_threshold(nbytes: int = 128 << 10) -> None:
    """glibc: give free memory at the heap's top back to the kernel past `nbytes` (its default), and keep it there:
    setting it turns off the dynamic adjustment that otherwise raises it to twice the largest freed mmap'd block
    (numpy temporaries of a 262k vocabulary: MBs held for nothing). Once per process; a no-op elsewhere."""
    global _trim_set
    if _trim_set:
        return
    _trim_set = True
    try:
        libc = ctypes.CDLL(None)
        mallopt = libc.mallopt
    except (OSError, AttributeError):   # not glibc (musl, macOS)
        return
    mallopt(ctypes.c_int(_M_TRIM_THRESHOLD), ctypes.c_int(nbytes))


def _free_count() -> int:
    """sys.getrefcount of a list's element that nobody else holds (2 where the call's argument counts; the
    interpreter decides, so it is measured)."""
    kept = [np.empty(1)]
    return sys.getrefcount(kept[0])


class RowBuffers:
    """Host arrays [n, width] float32 for a backend's returned rows, reused once no caller holds them (nor a view
    of them). A fresh array for every step maps fresh pages every step: 8 rows of a 49,152-token vocabulary fault
    ~400 pages in, about 1 ms a step on a VM, and Gemma 3's 1 MiB of logits cost ~0.35 ms a step on the GPU's host.
    Steps of at most max_rows rows reuse the last `keep` arrays made (the engine holds one step's rows at a time, a
    pipeline one per step in flight); bigger ones (prefill's every-token logits) get a new array. `alloc(shape)`
    makes the kept arrays (the GPU backend's are page-locked, so the logits come back in one DMA)."""

    FREE = _free_count()

    def __init__(self, max_rows: int = 16, keep: int = 3, alloc=None):
        self.max_rows, self.keep = max_rows, keep
        self._alloc = alloc if alloc is not None else (lambda shape: np.empty(shape, np.float32))
        self._kept: list[np.ndarray] = []   # oldest first

    def get(self, n: int, width: int) -> np.ndarray:
        if n > self.max_rows:
            return np.empty((n, width), np.float32)
        kept = self._kept
        for i in range(len(kept)):
            if kept[i].shape == (n, width) and sys.getrefcount(kept[i]) == self.FREE:
                kept.append(kept.pop(i))
                return kept[-1]
        kept.append(self._alloc((n, width)))
        if len(kept) > self.keep:
            del kept[0]
        return kept[-1]
