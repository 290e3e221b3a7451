"""Connections from the proxy to guest ports: each parses the responses for the one exchange
bound to it, and idle keep-alive connections wait in a pool for the next request to the same
VM incarnation (a VM that restarts or is restored gets a new key, so no request ever lands on a
connection to a guest that is gone)."""

from __future__ import annotations

import asyncio
import time
from typing import TYPE_CHECKING, Protocol

import httptools
import structlog

from hatchvm.proxy.headers import Headers, head_size

if TYPE_CHECKING:
    from hatchvm.proxy.exchange import Exchange

log = structlog.get_logger("hatchvm.proxy")

PoolKey = tuple[str, object, str, int]  # vm id, its incarnation, guest ip, port


def size(limit: int) -> str:
    """64 KiB, not 65536 bytes, when it is whole KiB."""
    return f"{limit >> 10} KiB" if limit % 1024 == 0 else f"{limit} bytes"


class Tunnel(Protocol):
    """The client side of an upgraded connection, as the upstream sees it."""

    transport: asyncio.Transport

    def peer_closed(self) -> None: ...

    def pause_reading(self, reason: str) -> None: ...

    def resume_reading(self, reason: str) -> None: ...


class Upstream(asyncio.Protocol):
    def __init__(self, pool: UpstreamPool, key: PoolKey) -> None:
        self.pool = pool
        self.key = key
        self.transport: asyncio.Transport | None = None
        self.exchange: Exchange | None = None
        self.tunnel: Tunnel | None = None  # after a 101: raw bytes to and from the client
        self.reused = False
        self.received = False  # any byte of the current exchange's response
        self.idle_since = 0.0
        self._parser = httptools.HttpResponseParser(self)
        self._headers: Headers = []
        self._reason = b""
        self._reading_paused = False
        # Guests are hostile: a head that never ends must not grow without bound. _framing
        # counts every byte read since the last head, body piece or message end (httptools
        # keeps an unfinished header line to itself, so only reads show it); it is also an
        # upper bound of a finished head's size (with the current read's length, should the
        # count have restarted inside it), so a head is summed only when that bound is over.
        self._max_head = pool.max_head
        self._framing = 0
        self._read = 0
        self._oversized = False

    # ---- transport events ----------------------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]

    def data_received(self, data: bytes) -> None:
        if self.tunnel is not None:
            self.tunnel.transport.write(data)
            return
        exchange = self.exchange
        if exchange is None:  # bytes nobody asked for: the connection cannot be trusted
            self.close()
            return
        self.received = True
        self._read = n = len(data)
        self._framing += n
        try:
            self._parser.feed_data(data)
        except httptools.HttpParserUpgrade as upgrade:
            exchange.upstream_switched(self, data[upgrade.args[0] :])
            return
        except httptools.HttpParserCallbackError as exc:
            if not self._oversized:  # a bug of ours: keep the trace
                log.error("proxy response handling failed", exc_info=exc.__context__)
                exchange.fail(500, "internal error")
                return
        except httptools.HttpParserError as exc:
            self.abort()
            exchange.fail(502, f"the target sent a malformed response: {exc}")
            return
        if self._oversized or self._framing > self._max_head:
            self._oversized = True
            self.abort()  # never reused: the rest of that head would follow
            limit = size(self._max_head)
            exchange.fail(502, f"the target's response head is larger than {limit}")

    def eof_received(self) -> bool:
        if self.tunnel is not None and self.tunnel.transport.can_write_eof():
            self.tunnel.transport.write_eof()
            return True  # half-close: the client may still be talking
        return False

    def connection_lost(self, exc: Exception | None) -> None:
        self.pool.discard(self)
        if self.tunnel is not None:
            self.tunnel.peer_closed()
        elif self.exchange is not None:
            self.exchange.upstream_lost(self, exc)

    @property
    def _sender(self) -> Tunnel | None:
        """The client connection whose bytes are being written here right now."""
        return self.tunnel or (self.exchange.client if self.exchange else None)

    def pause_writing(self) -> None:
        if (sender := self._sender) is not None:
            sender.pause_reading("upstream")

    def resume_writing(self) -> None:
        if (sender := self._sender) is not None:
            sender.resume_reading("upstream")

    # ---- response parsing (httptools callbacks) ------------------------------------------

    def on_status(self, reason: bytes) -> None:
        self._reason += reason

    def on_header(self, name: bytes, value: bytes) -> None:
        self._headers.append((name, value))

    def on_headers_complete(self) -> None:
        headers, self._headers = self._headers, []
        reason, self._reason = self._reason, b""
        limit = self._max_head
        if (self._framing > limit or self._read > limit) and (
            len(reason) + head_size(headers) > limit
        ):
            self._oversized = True
            raise httptools.HttpParserError("response head too large")  # stops the parse
        self._framing = 0
        exchange = self.exchange
        if exchange is None:
            return
        status = self._parser.get_status_code()
        keep_alive = self._parser.should_keep_alive()
        exchange.response_head(status, reason, headers)
        if exchange.method == b"HEAD" and status >= 200:
            # The parser cannot know a HEAD response has no body; end it here, fresh parser.
            self._parser = httptools.HttpResponseParser(self)
            exchange.response_done(keep_alive)

    def on_body(self, body: bytes) -> None:
        self._framing = 0
        if self.exchange is not None:
            self.exchange.response_body(body)

    def on_message_complete(self) -> None:
        self._framing = 0
        self._headers = []  # trailers (not forwarded): never the next response's headers
        if self.exchange is not None:
            self.exchange.response_done(self._parser.should_keep_alive())

    # ---- control -----------------------------------------------------------------------

    def write(self, data: bytes) -> None:
        if self.transport is not None:
            self.transport.write(data)

    def pause_reading(self) -> None:
        if not self._reading_paused and self.transport and not self.transport.is_closing():
            self._reading_paused = True
            self.transport.pause_reading()

    def resume_reading(self) -> None:
        if self._reading_paused and self.transport and not self.transport.is_closing():
            self._reading_paused = False
            self.transport.resume_reading()

    @property
    def closing(self) -> bool:
        return self.transport is None or self.transport.is_closing()

    def close(self) -> None:
        if self.transport is not None:
            self.transport.close()

    def abort(self) -> None:
        if self.transport is not None:
            self.transport.abort()


class UpstreamPool:
    """Idle keep-alive connections per (VM incarnation, port); the newest is reused first."""

    def __init__(
        self, max_head: int, idle_timeout: float = 30.0, connect_timeout: float = 10.0
    ) -> None:
        self.max_head = max_head  # bytes of a response head (and of framing between bodies)
        self.idle_timeout = idle_timeout
        self.connect_timeout = connect_timeout
        self._idle: dict[PoolKey, list[Upstream]] = {}

    def take(self, key: PoolKey) -> Upstream | None:
        idle = self._idle.get(key)
        while idle:
            upstream = idle.pop()
            if not upstream.closing:
                upstream.reused = True
                return upstream
        return None

    async def connect(self, key: PoolKey, timeout: float | None) -> Upstream:
        """A new connection to the key's guest port."""
        loop = asyncio.get_running_loop()
        _transport, upstream = await asyncio.wait_for(
            loop.create_connection(lambda: Upstream(self, key), key[2], key[3]),
            timeout,
        )
        return upstream

    def put(self, upstream: Upstream) -> None:
        """Back to the pool after a complete exchange; reading stays on to notice a close."""
        upstream.exchange = None
        upstream.received = False
        upstream.resume_reading()
        if upstream.closing:
            return
        upstream.idle_since = time.monotonic()
        self._idle.setdefault(upstream.key, []).append(upstream)

    def discard(self, upstream: Upstream) -> None:
        idle = self._idle.get(upstream.key)
        if idle and upstream in idle:
            idle.remove(upstream)
            if not idle:
                del self._idle[upstream.key]

    def expire(self, now: float) -> None:
        """Close connections idle for longer than idle_timeout (guests may forget them)."""
        for idle in list(self._idle.values()):
            for upstream in [u for u in idle if now - u.idle_since > self.idle_timeout]:
                upstream.close()
                self.discard(upstream)

    def close_all(self) -> None:
        for idle in list(self._idle.values()):
            for upstream in list(idle):
                upstream.close()
        self._idle.clear()
