"""Typed reads of GGUF metadata values: the type, the range and finiteness a key must have, or a ModelError naming it.

A metadata dict holds what the file says (GGUFFile.metadata: Python scalars, numpy arrays for numeric arrays,
lists of str for string arrays); a hostile or broken file can put any of those under any key. Every reader of a
key whose type matters goes through one of these.
"""

from __future__ import annotations

import math
from typing import Any, Mapping

import numpy as np

from .errors import ModelError

_MISSING = object()


def _fail(key: str, want: str, v: Any) -> ModelError:
    shown = repr(v) if not isinstance(v, (np.ndarray, list)) else f"an array of {len(v)}"
    return ModelError(f"metadata {key!r} must be {want}, got {shown[:80]}")


def _scalar(v):
    return v.item() if isinstance(v, np.generic) else v


def get_int(md: Mapping[str, Any], key: str, default: Any = _MISSING, *, lo: int | None = None,
            hi: int | None = None) -> Any:
    if key not in md:
        if default is _MISSING:
            raise ModelError(f"missing metadata key {key!r}")
        return default
    v = _scalar(md[key])
    if isinstance(v, bool) or not isinstance(v, (int, float)) or (isinstance(v, float) and not v.is_integer()):
        raise _fail(key, "an integer", v)
    v = int(v)
    if (lo is not None and v < lo) or (hi is not None and v > hi):
        raise _fail(key, f"an integer in [{lo}, {hi}]", v)
    return v


def get_float(md: Mapping[str, Any], key: str, default: Any = _MISSING, *, positive: bool = False) -> Any:
    if key not in md:
        if default is _MISSING:
            raise ModelError(f"missing metadata key {key!r}")
        return default
    v = _scalar(md[key])
    if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v) or (positive and v <= 0):
        raise _fail(key, "a finite positive number" if positive else "a finite number", v)
    return float(v)


def get_bool(md: Mapping[str, Any], key: str, default: bool) -> bool:
    """A GGUF bool (0/1 integers are taken too, as some writers store them); a string such as "no" is an error,
    not true."""
    if key not in md:
        return default
    v = _scalar(md[key])
    if isinstance(v, bool):
        return v
    if isinstance(v, int) and v in (0, 1):
        return bool(v)
    raise _fail(key, "a boolean", v)


def get_str(md: Mapping[str, Any], key: str, default: Any = None) -> Any:
    if key not in md:
        return default
    v = md[key]
    if not isinstance(v, str):
        raise _fail(key, "a string", v)
    return v


def get_str_list(md: Mapping[str, Any], key: str, copy: bool = True) -> list[str] | None:
    """copy=False hands back the metadata's own list (a vocabulary: 2 MB of pointers not duplicated); the caller
    must not change it."""
    if key not in md:
        return None
    v = md[key]
    if not isinstance(v, (list, tuple)) or not all(isinstance(x, str) for x in v):
        raise _fail(key, "an array of strings", v)
    return v if not copy and isinstance(v, list) else list(v)


def get_number_array(md: Mapping[str, Any], key: str, n: int, *, integer: bool, as_list: bool = True):
    """A numeric array of exactly n entries (integers, or finite numbers): a list, or (as_list=False) a numpy array
    of int64 / float64 (no Python object per entry)."""
    if key not in md:
        return None
    v = md[key]
    if not isinstance(v, np.ndarray) or v.ndim != 1 or v.dtype.kind not in ("iu" if integer else "iuf"):
        raise _fail(key, "an array of integers" if integer else "an array of numbers", v)
    if v.size != n:
        raise ModelError(f"metadata {key!r} has {v.size} entries for {n} tokens")
    if not integer and not np.isfinite(v).all():
        raise ModelError(f"metadata {key!r} holds a NaN or infinite value")
    out = v.astype(np.int64 if integer else np.float64)
    return out.tolist() if as_list else out
