"""Guest consoles, recorded by hatchd and bounded on disk.

The VMM streams a guest's console to a Unix socket; one recorder per running VM reads it and
appends to `console.log` in the VM's directory. When that file reaches half the bound it
becomes `console.log.1` (replacing the previous one), so the two files never hold more than
HATCH_CONSOLE_MAX_BYTES however fast a guest writes. While hatchd is down nobody reads the
socket and the VMM drops the output: the bound holds then too. Followers (`--follow`) get new
output as it is recorded.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
from collections.abc import AsyncIterator
from pathlib import Path

import structlog

from hatchvm.vmm.fifo import is_fifo, open_fifo

log = structlog.get_logger("hatchvm.console")

CONSOLE_LOG = "console.log"
OLDER_LOG = "console.log.1"
READ_SIZE = 64 << 10
FOLLOW_QUEUE = 256  # chunks a slow follower may lag behind before it is cut off


class ConsoleRecorder:
    """Reads one VM's console socket into its bounded log until the VMM closes it."""

    def __init__(self, vm_dir: Path, max_bytes: int) -> None:
        self.vm_dir = vm_dir
        self.half = max(max_bytes // 2, READ_SIZE)
        self.followers: set[asyncio.Queue[bytes | None]] = set()
        self.task: asyncio.Task[None] | None = None

    async def run(
        self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter | asyncio.BaseTransport
    ) -> None:
        path = self.vm_dir / CONSOLE_LOG
        out = _open_append(path)
        try:
            while data := await reader.read(READ_SIZE):
                if out.tell() + len(data) > self.half:
                    out.close()
                    os.replace(path, self.vm_dir / OLDER_LOG)
                    out = _open_append(path)
                out.write(data)
                out.flush()  # readers (the API, tests) see it at once
                for queue in list(self.followers):
                    if queue.full():  # too slow: cut off rather than buffer without end
                        self.followers.discard(queue)
                        queue.get_nowait()
                        queue.put_nowait(None)
                    else:
                        queue.put_nowait(data)
        except OSError:
            pass
        finally:
            out.close()
            writer.close()
            for queue in self.followers:
                with contextlib.suppress(asyncio.QueueFull):
                    queue.put_nowait(None)
            self.followers.clear()


def _open_append(path: Path):  # type: ignore[no-untyped-def]
    fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o600)
    return os.fdopen(fd, "ab", buffering=0)


class Consoles:
    """Every running VM's recorder; tails and follows for the API."""

    def __init__(self, max_bytes: int) -> None:
        self.max_bytes = max_bytes
        self._recorders: dict[str, ConsoleRecorder] = {}

    async def record(self, vm_id: str, vm_dir: Path, socket: Path) -> None:
        """Record the console of the VM's VMM (just started, or found at start-up). Returns
        once connected, so a guest let run afterwards loses nothing. Idempotent per run."""
        current = self._recorders.get(vm_id)
        if current is not None and current.task is not None and not current.task.done():
            return
        try:
            if socket.is_symlink():  # a jailed VMM owns its pipes' directory: never followed
                raise OSError(f"{socket} is a symlink")
            if is_fifo(socket):  # Firecracker writes the serial console to a named pipe
                reader, writer = await open_fifo(socket)
            else:
                reader, writer = await asyncio.open_unix_connection(str(socket))
        except OSError as exc:
            log.warning("guest console not recorded", vm_id=vm_id, reason=str(exc))
            return
        recorder = ConsoleRecorder(vm_dir, self.max_bytes)
        recorder.task = asyncio.create_task(recorder.run(reader, writer), name=f"console-{vm_id}")
        self._recorders[vm_id] = recorder
        recorder.task.add_done_callback(lambda _t: self._forget(vm_id, recorder))

    def _forget(self, vm_id: str, recorder: ConsoleRecorder) -> None:
        if self._recorders.get(vm_id) is recorder:
            del self._recorders[vm_id]

    async def close(self) -> None:
        for recorder in list(self._recorders.values()):
            if recorder.task is not None:
                recorder.task.cancel()

    @staticmethod
    def tail(vm_dir: Path, max_bytes: int) -> bytes:
        """The last max_bytes of the console (both files), starting at a line boundary when
        it was cut."""
        data = b""
        for name in (CONSOLE_LOG, OLDER_LOG):
            want = max_bytes - len(data)
            if want <= 0:
                break
            data = _last_bytes(vm_dir / name, want) + data
        if len(data) >= max_bytes and b"\n" in data:
            data = data[data.index(b"\n") + 1 :]
        return data

    def follow(self, vm_id: str) -> AsyncIterator[bytes]:
        """New console output from now on, until the VM's VMM ends (at once when it does not
        run). Subscribed on the call, so a tail read right after misses nothing."""
        recorder = self._recorders.get(vm_id)
        queue: asyncio.Queue[bytes | None] = asyncio.Queue(FOLLOW_QUEUE)
        if recorder is None:
            queue.put_nowait(None)
        else:
            recorder.followers.add(queue)
        return _drain(queue, recorder)


async def _drain(
    queue: asyncio.Queue[bytes | None], recorder: ConsoleRecorder | None
) -> AsyncIterator[bytes]:
    try:
        while (data := await queue.get()) is not None:
            yield data
    finally:
        if recorder is not None:
            recorder.followers.discard(queue)


def _last_bytes(path: Path, count: int) -> bytes:
    try:
        with path.open("rb") as f:
            size = f.seek(0, os.SEEK_END)
            f.seek(max(size - count, 0))
            return f.read(count)
    except FileNotFoundError:
        return b""


def last_lines(vm_dir: Path, lines: int = 20, max_bytes: int = 8 << 10) -> list[str]:
    """The console's last lines, as text, for a VM's last exit."""
    text = Consoles.tail(vm_dir, max_bytes).decode(errors="replace")
    return [line.rstrip("\r") for line in text.splitlines()[-lines:]]
