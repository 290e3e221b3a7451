"""Copying files that are mostly holes (a guest's memory file, a VM's disk): shared extents
where the file system can (a reflink), else only their data is read and written, in the kernel
(copy_file_range), and the copy has the same holes."""

from __future__ import annotations

import errno
import fcntl
import os
from pathlib import Path

CHUNK = 64 << 20
_FICLONE = 0x40049409  # ioctl: share the whole file's extents (btrfs, XFS)
_NO_REFLINK = (errno.EOPNOTSUPP, errno.EXDEV, errno.EINVAL, errno.ENOTTY)


def copy_sparse(src: Path, dst: Path, *, into: bool = False) -> int:
    """dst (made new, mode 0600): the same size and bytes as src, holes kept; the bytes
    copied (0 when reflinked). into: dst is an empty file of src's size already (all holes)
    that others may hold open or mapped: it is written into, never truncated or replaced."""
    copied = 0
    with src.open("rb") as fin:
        size = os.fstat(fin.fileno()).st_size
        flags = os.O_WRONLY if into else os.O_WRONLY | os.O_CREAT | os.O_TRUNC
        fd = os.open(dst, flags, 0o600)
        try:
            if into and os.fstat(fd).st_size != size:
                raise ValueError(f"{dst} is not {size} bytes long like {src}")
            try:
                fcntl.ioctl(fd, _FICLONE, fin.fileno())
                return 0
            except OSError as exc:
                if exc.errno not in _NO_REFLINK:
                    raise
            if not into:
                os.ftruncate(fd, size)
            offset = 0
            while offset < size:
                try:
                    start = os.lseek(fin.fileno(), offset, os.SEEK_DATA)
                except OSError:  # ENXIO: only holes from here on
                    break
                end = os.lseek(fin.fileno(), start, os.SEEK_HOLE)
                while start < end:
                    n = os.copy_file_range(fin.fileno(), fd, min(CHUNK, end - start), start, start)
                    if n == 0:
                        break
                    start += n
                    copied += n
                offset = end
        finally:
            os.close(fd)
    return copied


def make_holes(path: Path, size: int) -> None:
    """path (made new, mode 0600): size bytes, all holes, for copy_sparse(into=True)."""
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    try:
        os.ftruncate(fd, size)
    finally:
        os.close(fd)
