"""cffi build script of edgellm's C core (out-of-line API mode): `edgellm._native`.

setup.py wires it through `cffi_modules`; run directly (`python native/build_native.py`) it builds the module in
place for development. The cdef is the part of edgellm.h between the CFFI-BEGIN / CFFI-END markers, so the
header stays the single source of the API.

No -march=native: the ISA files carry their own `#pragma GCC target(...)` and dispatch.c picks one at run time,
so the same build runs on any x86-64 or aarch64 machine.
"""

from __future__ import annotations

import os
import sys

from cffi import FFI

HERE = os.path.dirname(os.path.abspath(__file__))
SOURCES = ["dispatch.c", "kernels_generic.c", "kernels_avx2.c", "kernels_vnni.c", "kernels_amx.c", "kernels_neon.c", "threadpool.c", "ops.c", "forward.c", "quantize.c"]
CFLAGS = ["-O3", "-std=c11", "-fPIC", "-pthread", "-fno-math-errno", "-Wall", "-Wno-unused-function"]


def cdef_text() -> str:
    with open(os.path.join(HERE, "edgellm.h"), encoding="utf-8") as f:
        text = f.read()
    start, end = text.index("/* CFFI-BEGIN */"), text.index("/* CFFI-END */")
    return text[start + len("/* CFFI-BEGIN */"):end]


def _rel(path: str) -> str:
    # setuptools prefers source paths relative to the project root (where setup.py runs)
    try:
        rel = os.path.relpath(path)
    except ValueError:
        return path
    return path if rel.startswith("..") else rel


def make_ffi(relative: bool = True) -> FFI:
    p = _rel if relative else (lambda path: path)
    f = FFI()
    f.cdef(cdef_text())
    f.set_source(
        "edgellm._native",
        '#include "edgellm.h"\n',
        sources=[p(os.path.join(HERE, s)) for s in SOURCES],
        include_dirs=[p(HERE)],
        depends=[p(os.path.join(HERE, h)) for h in ("edgellm.h", "quants.h", "kernels.h", "threadpool.h", "weights.h", "kq_x8.h", "pairs512.h")],
        extra_compile_args=CFLAGS,
        extra_link_args=["-pthread"],
        libraries=["m"],
    )
    return f


ffi = make_ffi()  # what setup.py's cffi_modules reads


def _compile_inplace() -> bool:
    import glob
    import shutil

    # absolute paths: cffi compiles from inside tmpdir. Fails loudly, unlike the optional build of setup.py.
    so = make_ffi(relative=False).compile(tmpdir=os.path.join("native", "_build"), verbose=False)
    # one module file in the package, under the name pip's editable build gives it, so neither shadows the other
    for old in glob.glob(os.path.join("edgellm", "_native*.so")):
        os.remove(old)
    shutil.copy(so, os.path.join("edgellm", "_native.abi3.so"))
    return True


if __name__ == "__main__":
    # development build: drop the module into the edgellm package next to this folder
    os.chdir(os.path.join(HERE, ".."))
    sys.exit(0 if _compile_inplace() else 1)
