"""Backends: one interface (`forward(tokens, positions, cache, all_logits)`), several engines.

`native_available()` says whether the C core was built at install time; `load_native()` returns its cffi
(ffi, lib) pair or raises ImportError naming why not.
"""

from __future__ import annotations


def load_native():
    """(ffi, lib) of edgellm's C core; ImportError when the package was installed without a compiler."""
    from .._native import ffi, lib
    return ffi, lib


def native_available() -> bool:
    try:
        load_native()
    except ImportError:
        return False
    return True
