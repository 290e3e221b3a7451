"""hatchd's end of one VM's agent port.

The VMM serves the port as a Unix socket with one client at a time. A channel connects on
demand, so a VMM started or restored anew (a new socket) is reached again, and a connection
dropped because the guest spoke garbage is made afresh by the next request, never in a loop.
One reader per connection matches answers to requests by id. Everything read from the guest is
bounded: one frame at a time (16-byte header, payload <= 64 KiB), a few frames nobody asked for
before the connection is dropped, and a deadline on every wait.

A long answer (a command's output, a file) is an Exchange: the agent may send as many frames
as hatchd granted (the request's WINDOW, then CREDIT as the consumer takes them), so no more
than the window is ever queued here however slow the consumer; one frame past the grant drops
the connection. An exchange given up before its end is cancelled, and the frames already on
their way for it (at most what was granted) are read and dropped.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import secrets
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType

import structlog

from hatchvm.agent.errors import AgentError, AgentTimeout, AgentUnavailable, ProtocolError
from hatchvm.agent.protocol import (
    END,
    MAX_ID,
    REPLY,
    Fields,
    Frame,
    MsgType,
    Tag,
    encode,
    int_field,
    read_frame,
)

log = structlog.get_logger("hatchvm.agent")

MAX_IN_FLIGHT = 64  # requests waiting for an answer on one channel
QUEUE_FRAMES = 16  # the largest window: frames of one answer not yet taken by its requester
MAX_UNSOLICITED = 16  # frames nobody asked for (late answers, complaints) per connection
READ_LIMIT = 64 << 10  # the stream's buffer; read_frame never asks for more than one frame
FRAME_S = 10.0  # a frame begun must be whole within this (the port moves megabytes a second)

RESTARTED = "the guest agent restarted; what it was doing for this request is lost"


class _Connection:
    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.reader = reader
        self.writer = writer
        self.unsolicited = 0
        self.task: asyncio.Task[None] | None = None


@dataclass
class _Pending:
    """One request waiting for its answer."""

    queue: asyncio.Queue[Frame | AgentError]
    granted: int  # frames without END the agent may send
    received: int = 0  # frames without END it sent
    answered: bool = False  # some frame came: the agent that got the request is at work


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
        self._pending: dict[int, _Pending] = {}
        self._draining: dict[int, int] = {}  # cancelled id -> frames that may still come
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
        async with self.exchange(type_, fields, timeout, window=0) as exchange:
            return await exchange.next()

    async def stream(
        self, type_: int, fields: Fields, timeout: float, window: int = QUEUE_FRAMES
    ) -> AsyncIterator[Frame]:
        """Send one request; the frames answering it, the last one with END. timeout bounds
        the wait for each frame."""
        async with self.exchange(type_, fields, timeout, window=window) as exchange:
            while True:
                frame = await exchange.next()
                yield frame
                if frame.end:
                    return

    def exchange(self, type_: int, fields: Fields, timeout: float, window: int) -> Exchange:
        """A request with an answer of many frames: `async with` it (or start() and close()).
        window: frames the agent may send before the consumer takes any (also sent in the
        request as WINDOW when above 0); timeout: the default bound of each wait."""
        if not 0 <= window <= QUEUE_FRAMES:
            raise ValueError(f"window {window} out of 0..{QUEUE_FRAMES}")
        if window:
            fields = (*fields, int_field(Tag.WINDOW, window))
        return Exchange(self, type_, fields, timeout, window)

    # ---- inside an exchange ---------------------------------------------------------------

    async def _open(self, request: Frame, pending: _Pending, timeout: float) -> _Connection:
        if len(self._pending) >= MAX_IN_FLIGHT:
            raise AgentError("too many requests to the guest agent in flight")
        self._pending[request.id] = pending
        try:
            async with asyncio.timeout(timeout):
                await self.connect()
                conn = self._conn
                if conn is None:
                    raise AgentUnavailable("the guest agent's port closed")
                await self._write(conn, request)
            return conn
        except TimeoutError:
            self._pending.pop(request.id, None)
            raise AgentTimeout(f"the guest agent did not answer in {timeout:g} s") from None
        except BaseException:
            self._pending.pop(request.id, None)
            raise

    async def _write(self, conn: _Connection, frame: Frame) -> None:
        if self._conn is not conn:
            raise AgentUnavailable("the guest agent's port closed")
        try:
            conn.writer.write(encode(frame))
            await conn.writer.drain()
        except OSError as exc:  # the VMM went away under us
            raise AgentUnavailable(f"the guest agent's port closed: {exc}") from None

    def _finish(self, request_id: int, pending: _Pending, conn: _Connection | None) -> None:
        """The exchange is over. Unless its answer ended, tell the agent to stop, and expect
        what it may still send (what was granted, and an END) to come and be dropped."""
        self._pending.pop(request_id, None)
        queued = [item for item in _drain(pending.queue) if isinstance(item, Frame)]
        if any(f.end for f in queued) or conn is None or self._conn is not conn:
            return
        with contextlib.suppress(OSError, RuntimeError):
            conn.writer.write(encode(Frame(MsgType.CANCEL, request_id)))
        self._draining[request_id] = pending.granted - pending.received + 1
        while len(self._draining) > MAX_IN_FLIGHT:
            self._draining.pop(next(iter(self._draining)))

    def _next_id(self) -> int:
        request_id = next(self._ids)
        if request_id > MAX_ID:
            self._ids = itertools.count(2)
            request_id = 1
        return request_id

    # ---- the reader ------------------------------------------------------------------------

    async def _read(self, conn: _Connection) -> None:
        error: AgentError = AgentUnavailable("the guest agent's port closed")
        try:
            while True:
                self._deliver(conn, await read_frame(conn.reader, FRAME_S))
        except ProtocolError as exc:
            error = ProtocolError(f"the guest agent broke the protocol: {exc}")
            log.warning("guest agent connection dropped", vm_id=self.vm_id, reason=str(error))
        except (asyncio.IncompleteReadError, OSError):
            pass
        finally:
            self._drop(conn, error)

    def _deliver(self, conn: _Connection, frame: Frame) -> None:
        pending = self._pending.get(frame.id)
        if pending is None:
            if self._drained(frame):
                return
            conn.unsolicited += 1
            if conn.unsolicited > MAX_UNSOLICITED:
                raise ProtocolError(f"more than {MAX_UNSOLICITED} frames nobody asked for")
            if frame.id == 0 and frame.type == MsgType.HELLO | REPLY:
                self._restarted()
            if self.on_unsolicited is not None:
                self.on_unsolicited(frame)
            return
        pending.answered = True
        if not frame.end:
            pending.received += 1
            if pending.received > pending.granted:
                raise ProtocolError(
                    f"more than the {pending.granted} frames granted for one answer"
                )
        if pending.queue.qsize() >= QUEUE_FRAMES + 1:
            raise ProtocolError(f"more than {QUEUE_FRAMES} frames queued for one request")
        pending.queue.put_nowait(frame)

    def _drained(self, frame: Frame) -> bool:
        """A frame of a cancelled exchange, within what it may still send: dropped."""
        left = self._draining.get(frame.id)
        if left is None:
            return False
        if frame.end or left <= 1:
            del self._draining[frame.id]
        else:
            self._draining[frame.id] = left - 1
        return True

    def _restarted(self) -> None:
        """A new agent said hello unasked: the old one died. The requests it had started
        answering are lost; one it never answered may be in the new agent's hands, and
        runs on to its own deadline."""
        lost = 0
        for pending in self._pending.values():
            if pending.answered and not pending.queue.full():
                pending.granted = -1  # whatever else comes for it is a protocol error
                pending.queue.put_nowait(AgentUnavailable(RESTARTED))
                lost += 1
        log.info("a guest agent started", vm_id=self.vm_id, requests_lost=lost)

    def _drop(self, conn: _Connection, error: AgentError) -> None:
        """The connection is over: whoever waits on it hears why."""
        if self._conn is conn:
            self._conn = None
        conn.writer.close()
        self._draining.clear()
        for pending in self._pending.values():
            with contextlib.suppress(asyncio.QueueFull):
                pending.queue.put_nowait(error)

    def close(self) -> None:
        """For good (the VM's VMM was replaced or the VM deleted)."""
        self._closed = True
        conn = self._conn
        if conn is not None and conn.task is not None:
            conn.task.cancel()


def _drain(queue: asyncio.Queue[Frame | AgentError]) -> list[Frame | AgentError]:
    items = []
    while not queue.empty():
        items.append(queue.get_nowait())
    return items


class Exchange:
    """One request and its answer of many frames (see the module's docstring)."""

    def __init__(
        self, channel: AgentChannel, type_: int, fields: Fields, timeout: float, window: int
    ) -> None:
        self._channel = channel
        self._request = Frame(type_, channel._next_id(), fields)
        self._timeout = timeout
        self._window = window
        # Room for every granted frame, the END, and the error that ends a connection.
        queue: asyncio.Queue[Frame | AgentError] = asyncio.Queue(QUEUE_FRAMES + 2)
        self._pending = _Pending(queue, granted=window)
        self._conn: _Connection | None = None
        self._owed = 0  # frames taken, not yet given back as credit
        self.ended = False  # the frame with END was taken

    @property
    def id(self) -> int:
        return self._request.id

    async def start(self) -> Exchange:
        self._conn = await self._channel._open(self._request, self._pending, self._timeout)
        return self

    async def close(self) -> None:
        """Done with it: cancelled in the agent unless its answer ended. A one-frame answer
        (window 0) is not: there is nothing to stop, and a late answer to it is news (a late
        sync, a late hello)."""
        running = not self.ended and self._window > 0
        self._channel._finish(self.id, self._pending, self._conn if running else None)

    async def __aenter__(self) -> Exchange:
        return await self.start()

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.close()

    async def next(self, timeout: float | None = None) -> Frame:
        """The next frame of the answer (AgentTimeout after timeout, default the
        exchange's); its credit goes back to the agent as it is taken."""
        wait = self._timeout if timeout is None else timeout
        try:
            async with asyncio.timeout(max(wait, 0)):
                item = await self._pending.queue.get()
        except TimeoutError:
            raise AgentTimeout(f"the guest agent did not answer in {wait:g} s") from None
        if isinstance(item, AgentError):
            self.ended = True  # the connection or the agent is gone: nothing more comes
            raise item
        if item.end:
            self.ended = True
        else:
            await self._give_back()
        return item

    def take_queued(self) -> Frame | None:
        """A frame already waiting, taken without waiting (or the failure that ended the
        connection, raised); None when nothing is. For checking on the agent while input is
        being sent, when only an early END or ERROR can come."""
        if self._pending.queue.empty():
            return None
        item = self._pending.queue.get_nowait()
        if isinstance(item, AgentError):
            self.ended = True
            raise item
        self.ended = self.ended or item.end
        return item

    async def send(self, type_: int, fields: Fields = (), *, end: bool = False) -> None:
        """A frame about this request (INPUT): on the connection the request went out on,
        bounded by the exchange's timeout (an agent that stops reading stalls the write)."""
        conn = self._conn
        if conn is None:
            raise AgentUnavailable("the request was not sent")
        frame = Frame(type_, self.id, fields, flags=END if end else 0)
        try:
            async with asyncio.timeout(self._timeout):
                await self._channel._write(conn, frame)
        except TimeoutError:
            raise AgentTimeout(f"the guest agent took nothing for {self._timeout:g} s") from None

    async def _give_back(self) -> None:
        self._owed += 1
        if self._owed < max(1, self._window // 2) or self._conn is None:
            return
        owed, self._owed = self._owed, 0
        self._pending.granted += owed
        with contextlib.suppress(AgentError):  # a gone connection shows at the next read
            await self._channel._write(
                self._conn, Frame(MsgType.CREDIT, self.id, (int_field(Tag.CREDIT, owed),))
            )
