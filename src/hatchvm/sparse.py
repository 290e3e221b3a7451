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


def copy_sparse(src: Path, dst: Path) -> int:
    """dst (made new, mode 0600): the same size and bytes as src, holes kept; the bytes
    copied (0 when reflinked)."""
    copied = 0
    with src.open("rb") as fin:
        size = os.fstat(fin.fileno()).st_size
        fd = os.open(dst, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        try:
            try:
                fcntl.ioctl(fd, _FICLONE, fin.fileno())
                return 0
            except OSError as exc:
                if exc.errno not in _NO_REFLINK:
                    raise
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
