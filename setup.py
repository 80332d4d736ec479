"""Build hook of the native core. Everything else about the package lives in pyproject.toml.

The C core is optional at install time: when no compiler works (missing, or failing), build_ext warns and the
package installs without `edgellm._native`; `edgellm.backends.native_available()` then says False and the
driver runs the numpy/numba backends.
"""

import sys

from setuptools import setup
from setuptools.command.build_ext import build_ext


class OptionalBuildExt(build_ext):
    """build_ext that turns a compiler failure into a warning instead of a failed install."""

    def run(self):
        try:
            super().run()
        except Exception as exc:  # noqa: BLE001 - missing compiler, platform errors, cffi generation: all optional
            self._warn(exc)

    def build_extension(self, ext):
        try:
            super().build_extension(ext)
        except Exception as exc:  # noqa: BLE001 - CompileError, LinkError, DistutilsExecError, OSError ...
            self._warn(exc, ext.name)

    @staticmethod
    def _warn(exc, name="edgellm._native"):
        print(f"WARNING: could not build {name} ({type(exc).__name__}: {exc}); "
              "edgellm installs without its native core and falls back to the numpy backends",
              file=sys.stderr)


setup(
    cffi_modules=["native/build_native.py:ffi"],
    cmdclass={"build_ext": OptionalBuildExt},
    # cffi compiles the module against the stable ABI (edgellm/_native.abi3.so): one wheel serves Python 3.11 and up
    options={"bdist_wheel": {"py_limited_api": "cp311"}},
)
