"""Opening user-named files for reading: regular files only, without blocking on a FIFO."""

from __future__ import annotations

import os
import stat
from typing import BinaryIO


def open_regular(path, error: type[Exception], what: str = "") -> tuple[BinaryIO, int]:
    """(binary file, size) of a regular file. O_NONBLOCK, so that a FIFO is refused instead of waiting for a writer;
    a FIFO, device, directory or unreadable path raises `error` naming "{what} {path}"."""
    name = f"{what} {path}" if what else f"{path}"
    try:
        fd = os.open(path, os.O_RDONLY | getattr(os, "O_NONBLOCK", 0))
    except OSError as e:
        raise error(f"cannot read {name}: {e.strerror or e}") from None
    st = os.fstat(fd)   # before fdopen, which refuses a directory with its own OSError
    if not stat.S_ISREG(st.st_mode):
        os.close(fd)
        raise error(f"{name} is not a regular file")
    return os.fdopen(fd, "rb"), st.st_size
