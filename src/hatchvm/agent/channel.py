"""hatchd's end of one VM's agent port.

The VMM serves the port as a Unix socket with one client at a time. A channel connects on
demand, so a VMM started or restored anew (a new socket) is reached again, and a connection
dropped because the guest spoke garbage is made afresh by the next request, never in a loop.
One reader per connection matches answers to requests by id. Everything read from the guest is
bounded: one frame at a time (16-byte header, payload <= 64 KiB), a few frames queued per
request, a few frames nobody asked for before the connection is dropped, and a deadline on
every request.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import secrets
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path

import structlog

from hatchvm.agent.errors import AgentError, AgentTimeout, AgentUnavailable, ProtocolError
from hatchvm.agent.protocol import MAX_ID, Fields, Frame, encode, read_frame

log = structlog.get_logger("hatchvm.agent")

MAX_IN_FLIGHT = 64  # requests waiting for an answer on one channel
QUEUE_FRAMES = 16  # frames of one answer not yet taken by its requester
MAX_UNSOLICITED = 16  # frames nobody asked for (late answers, complaints) per connection
READ_LIMIT = 64 << 10  # the stream's buffer; read_frame never asks for more than one frame


class _Connection:
    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.reader = reader
        self.writer = writer
        self.unsolicited = 0
        self.task: asyncio.Task[None] | None = None


class AgentChannel:
    def __init__(
        self, vm_id: str, path: Path, on_unsolicited: Callable[[Frame], None] | None = None
    ) -> None:
        self.vm_id = vm_id
        self.path = path
        self.on_unsolicited = on_unsolicited
        # Ids start anywhere and run on across connections: a late answer to a request of an
        # earlier connection, or of the VM's channel before a restore, matches nothing.
        self._ids = itertools.count(secrets.randbelow(MAX_ID) + 1)
        self._pending: dict[int, asyncio.Queue[Frame | AgentError]] = {}
        self._conn: _Connection | None = None
        self._connect_lock = asyncio.Lock()
        self._closed = False

    @property
    def connected(self) -> bool:
        return self._conn is not None

    async def connect(self) -> None:
        """Connect unless connected; AgentUnavailable if the port cannot be reached."""
        async with self._connect_lock:
            if self._conn is not None:
                return
            if self._closed:
                raise AgentUnavailable("the agent channel is closed")
            try:
                reader, writer = await asyncio.open_unix_connection(
                    str(self.path), limit=READ_LIMIT
                )
            except OSError as exc:
                raise AgentUnavailable(
                    f"cannot reach the guest agent's port: {exc.strerror or exc}"
                ) from None
            conn = _Connection(reader, writer)
            conn.task = asyncio.create_task(self._read(conn), name=f"agent-{self.vm_id}")
            self._conn = conn

    async def request(self, type_: int, fields: Fields, timeout: float) -> Frame:
        """Send one request; its one answer (a frame with END)."""
        async with self._exchange(type_, fields, timeout) as next_frame:
            return await next_frame()

    async def stream(self, type_: int, fields: Fields, timeout: float) -> AsyncIterator[Frame]:
        """Send one request; the frames answering it, the last one with END. timeout bounds
        the wait for each frame."""
        async with self._exchange(type_, fields, timeout) as next_frame:
            while True:
                frame = await next_frame()
                yield frame
                if frame.end:
                    return

    @contextlib.asynccontextmanager
    async def _exchange(
        self, type_: int, fields: Fields, timeout: float
    ) -> AsyncIterator[Callable[[], Awaitable[Frame]]]:
        """Send the request; yield what awaits each frame of its answer."""
        if len(self._pending) >= MAX_IN_FLIGHT:
            raise AgentError("too many requests to the guest agent in flight")
        request_id = self._next_id()
        # One slot more than frames may take: the error that ends the connection always fits.
        queue: asyncio.Queue[Frame | AgentError] = asyncio.Queue(QUEUE_FRAMES + 1)
        self._pending[request_id] = queue
        late = AgentTimeout(f"the guest agent did not answer in {timeout:g} s")
        loop = asyncio.get_running_loop()
        # The first frame is due `timeout` after the request began, each next one `timeout`
        # after the one before.
        deadline = loop.time() + timeout

        async def next_frame() -> Frame:
            nonlocal deadline
            try:
                async with asyncio.timeout_at(deadline):
                    item = await queue.get()
            except TimeoutError:
                raise late from None
            deadline = loop.time() + timeout
            if isinstance(item, AgentError):
                raise item
            return item

        try:
            try:
                async with asyncio.timeout_at(deadline):
                    await self.connect()
                    conn = self._conn
                    if conn is None:
                        raise AgentUnavailable("the guest agent's port closed")
                    conn.writer.write(encode(Frame(type_, request_id, fields)))
                    await conn.writer.drain()
            except TimeoutError:
                raise late from None
            except OSError as exc:  # the VMM went away under us
                raise AgentUnavailable(f"the guest agent's port closed: {exc}") from None
            yield next_frame
        finally:
            self._pending.pop(request_id, None)

    def _next_id(self) -> int:
        request_id = next(self._ids)
        if request_id > MAX_ID:
            self._ids = itertools.count(2)
            request_id = 1
        return request_id

    async def _read(self, conn: _Connection) -> None:
        error: AgentError = AgentUnavailable("the guest agent's port closed")
        try:
            while True:
                self._deliver(conn, await read_frame(conn.reader))
        except ProtocolError as exc:
            error = ProtocolError(f"the guest agent broke the protocol: {exc}")
            log.warning("guest agent connection dropped", vm_id=self.vm_id, reason=str(error))
        except (asyncio.IncompleteReadError, OSError):
            pass
        finally:
            self._drop(conn, error)

    def _deliver(self, conn: _Connection, frame: Frame) -> None:
        queue = self._pending.get(frame.id)
        if queue is None:
            conn.unsolicited += 1
            if conn.unsolicited > MAX_UNSOLICITED:
                raise ProtocolError(f"more than {MAX_UNSOLICITED} frames nobody asked for")
            if self.on_unsolicited is not None:
                self.on_unsolicited(frame)
            return
        if queue.qsize() >= QUEUE_FRAMES:
            raise ProtocolError(f"more than {QUEUE_FRAMES} frames queued for one request")
        queue.put_nowait(frame)

    def _drop(self, conn: _Connection, error: AgentError) -> None:
        """The connection is over: whoever waits on it hears why."""
        if self._conn is conn:
            self._conn = None
        conn.writer.close()
        for queue in self._pending.values():
            with contextlib.suppress(asyncio.QueueFull):
                queue.put_nowait(error)

    def close(self) -> None:
        """For good (the VM's VMM was replaced or the VM deleted)."""
        self._closed = True
        conn = self._conn
        if conn is not None and conn.task is not None:
            conn.task.cancel()
