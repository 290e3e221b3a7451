"""Named pipes a VMM writes to (Firecracker's serial console, log and metrics).

Firecracker opens each with O_RDWR | O_NONBLOCK: it never blocks on them, and once 64 KiB are
unread its writes fail and the output is dropped. So while nobody reads (hatchd down) a guest
that writes without end costs the host nothing, and whatever hatchd keeps is bounded by the
reader (`drain` here, the console recorder in core/console.py).
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import os
import stat
from pathlib import Path

READ_SIZE = 64 << 10


def make_fifo(path: Path) -> None:
    path.unlink(missing_ok=True)
    os.mkfifo(path, 0o600)


def is_fifo(path: Path) -> bool:
    try:
        return stat.S_ISFIFO(path.stat().st_mode)
    except OSError:
        return False


def open_fifo_fd(path: Path, flags: int) -> int:
    """The pipe at path opened non-blocking, never what a symlink there points to and never
    anything but a pipe: a jailed Firecracker owns the directory of its pipes and could swap
    one for a link to a host file, which hatchd would then record as the guest's output."""
    fd = os.open(path, flags | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC)
    if not stat.S_ISFIFO(os.fstat(fd).st_mode):
        os.close(fd)
        raise OSError(errno.EINVAL, f"{path} is not a named pipe")
    return fd


async def open_fifo(path: Path) -> tuple[asyncio.StreamReader, asyncio.BaseTransport]:
    """A reader of the pipe; it reaches EOF once every writer has closed it (the VMM ended).
    Open it only while the VMM holds it open, or it ends at once."""
    fd = open_fifo_fd(path, os.O_RDONLY)
    loop = asyncio.get_running_loop()
    reader = asyncio.StreamReader(limit=READ_SIZE, loop=loop)
    try:
        transport, _ = await loop.connect_read_pipe(
            lambda: asyncio.StreamReaderProtocol(reader), os.fdopen(fd, "rb", buffering=0)
        )
    except BaseException:
        with contextlib.suppress(OSError):
            os.close(fd)
        raise
    return reader, transport


async def drain(path: Path, dest: Path, max_bytes: int) -> None:
    """Append what the VMM writes to the pipe to dest until the VMM ends. dest and dest.1 hold
    at most max_bytes together: at half of it dest becomes dest.1."""
    try:
        reader, transport = await open_fifo(path)
    except OSError:
        return
    half = max(max_bytes // 2, READ_SIZE)
    out = dest.open("ab")
    try:
        while data := await reader.read(READ_SIZE):
            if out.tell() + len(data) > half:
                out.close()
                os.replace(dest, dest.with_name(dest.name + ".1"))
                out = dest.open("ab")
            out.write(data)
            out.flush()
    except OSError:
        pass
    finally:
        out.close()
        transport.close()
