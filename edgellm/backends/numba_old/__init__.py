"""The numba backend: edgellm's forward step on numba-compiled kernels, for CPUs without the native core.

Importing this package imports numba; nothing else in edgellm does, so `import edgellm` and the native path
never pay for it. Use: `from edgellm.backends.numba import NumbaBackend`.
"""

from .backend import NumbaBackend

__all__ = ["NumbaBackend"]
