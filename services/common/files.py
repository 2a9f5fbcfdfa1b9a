"""The file operations every durable writer here needs (audit log, checkpoints, spool)."""

from __future__ import annotations

import contextlib
import os
import pathlib


def write_all(fd: int, data: bytes) -> None:
    """`os.write` until every byte is written (a write may be short)."""
    view = memoryview(data)
    while view:
        view = view[os.write(fd, view):]


def append_durably(fd: int, data: bytes, size_before: int) -> None:
    """Appends `data` and fdatasyncs; on a failure cuts the file back to `size_before` (best
    effort) and re-raises, so no half-written bytes are left for the next append to follow."""
    try:
        write_all(fd, data)
        os.fdatasync(fd)
    except OSError:
        with contextlib.suppress(OSError):
            os.ftruncate(fd, size_before)
            os.fdatasync(fd)
        raise


def fsync_directory(directory: pathlib.Path) -> None:
    """Makes a new, renamed or deleted file's name durable, not only its bytes."""
    fd = os.open(directory, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
