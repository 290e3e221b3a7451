"""One client connection to the proxy: parses its requests (each routed by its own Host header,
as an edge proxy reuses connections across hosts), answers them in order, applies back-pressure
both ways, and after a 101 becomes a plain byte tunnel to the guest."""

from __future__ import annotations

import asyncio
import time
from collections import deque
from typing import TYPE_CHECKING

import httptools
import structlog

from hatchvm.proxy.exchange import Exchange
from hatchvm.proxy.headers import HOP_BY_HOP, Headers, connection_tokens, error_response
from hatchvm.proxy.upstream import Upstream

if TYPE_CHECKING:
    from hatchvm.proxy.server import Proxy

log = structlog.get_logger("hatchvm.proxy")

MAX_HEAD_BYTES = 64 * 1024  # request line and headers; more is an abuse, not a request


class ClientConnection(asyncio.Protocol):
    def __init__(self, proxy: Proxy) -> None:
        self.proxy = proxy
        self.transport: asyncio.Transport | None = None
        self.ip = b""
        self.write_paused = False
        self.idle_since = time.monotonic()
        self._parser = httptools.HttpRequestParser(self)
        self._queue: deque[Exchange] = deque()  # in arrival order; the first one is served
        self._incoming: Exchange | None = None  # the request whose body is arriving
        self._paused: set[str] = set()
        self._peer: Upstream | None = None  # once tunnelled
        self._tunnel_early: list[bytes] = []  # client bytes after an upgrade request
        self._tunnel_activity: tuple[str, float] | None = None
        self._closed = False
        self._eof = False
        self._bad_request: tuple[int, str] | None = None  # answered once the queue drains
        self._reset_head()

    def _reset_head(self) -> None:
        self._url = b""
        self._host = b""
        self._headers: Headers = []
        self._head_bytes = 0
        self._dropped = HOP_BY_HOP
        self._upgrade: bytes | None = None
        self._chunked = False
        self._sized = False

    # ---- transport events ----------------------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]
        peer = transport.get_extra_info("peername")
        self.ip = str(peer[0]).encode() if peer else b"unknown"
        self.proxy.connections.add(self)

    def data_received(self, data: bytes) -> None:
        if self._peer is not None:
            self._peer.write(data)
            return
        if "upgrade" in self._paused:  # an upgrade request awaits the guest's answer
            self._tunnel_early.append(data)
            self.pause_reading("upgrade")
            return
        try:
            self._parser.feed_data(data)
        except httptools.HttpParserUpgrade as upgrade:
            self._tunnel_early.append(data[upgrade.args[0] :])
            self.pause_reading("upgrade")
        except httptools.HttpParserCallbackError as exc:
            if self._bad_request is None:  # a bug of ours, not the client's: keep the trace
                log.error("proxy request handling failed", exc_info=exc.__context__)
                self._reject(500, "internal error")
            else:
                self._reject(*self._bad_request)  # one of our callbacks refused the request
        except httptools.HttpParserError as exc:
            self._reject(400, f"malformed request: {exc}")

    def eof_received(self) -> bool:
        if self._peer is not None and self._peer.transport is not None:
            if self._peer.transport.can_write_eof():
                self._peer.transport.write_eof()
                return True  # half-close: the guest may still answer
        self._eof = True
        # Answer what was fully asked before closing; a half-sent request never completes.
        return bool(self._queue) and self._incoming is None

    def connection_lost(self, exc: Exception | None) -> None:
        self._closed = True
        self.proxy.connections.discard(self)
        for exchange in self._queue:
            exchange.client_gone()
        self._queue.clear()
        if self._peer is not None:
            self._peer.close()
        self._end_tunnel_activity()

    @property
    def _feeder(self) -> Upstream | None:
        """The guest connection whose bytes this client is being sent right now."""
        return self._peer or (self._queue[0].upstream if self._queue else None)

    def pause_writing(self) -> None:
        self.write_paused = True
        if (feeder := self._feeder) is not None:
            feeder.pause_reading()

    def resume_writing(self) -> None:
        self.write_paused = False
        if (feeder := self._feeder) is not None:
            feeder.resume_reading()

    # ---- request parsing (httptools callbacks) -------------------------------------------

    def on_url(self, url: bytes) -> None:
        self._url += url
        self._count(len(url))

    def on_header(self, name: bytes, value: bytes) -> None:
        self._headers.append((name, value))
        self._count(len(name) + len(value))
        low = name.lower()
        if low == b"connection":
            self._dropped = self._dropped | connection_tokens(value)
        elif low == b"host":
            self._host = value
        elif low == b"upgrade":
            self._upgrade = value
        elif low == b"transfer-encoding":
            self._chunked = True
        elif low == b"content-length":
            self._sized = value.strip() not in (b"", b"0")

    def on_headers_complete(self) -> None:
        parser = self._parser
        if parser.get_method() == b"CONNECT":
            self._refuse(400, "CONNECT is not supported: this is a reverse proxy")
        exchange = Exchange(
            self,
            parser.get_method(),
            self._url,
            self._headers,
            self._dropped,
            http11=parser.get_http_version() == "1.1",
            keep_alive=parser.should_keep_alive(),
            chunked=self._chunked,
            has_body=self._chunked or self._sized,
            upgrade=self._upgrade if parser.should_upgrade() else None,
        )
        exchange.host = self._host
        self._reset_head()
        self._incoming = exchange
        self._queue.append(exchange)
        if len(self._queue) == 1:
            self.proxy.begin(exchange)
        else:
            self.pause_reading("queued")  # pipelined: one at a time, in order

    def on_body(self, body: bytes) -> None:
        if self._incoming is not None:
            self._incoming.request_body(body)

    def on_message_complete(self) -> None:
        if self._incoming is not None:
            self._incoming.request_done()
            self._incoming = None

    def _count(self, size: int) -> None:
        self._head_bytes += size
        if self._head_bytes > MAX_HEAD_BYTES:
            self._refuse(431, "request head larger than 64 KiB")

    def _refuse(self, status: int, message: str) -> None:
        self._bad_request = (status, message)
        raise httptools.HttpParserError(message)  # stops the parse; data_received answers

    # ---- exchanges -------------------------------------------------------------------------

    def exchange_finished(self, exchange: Exchange) -> None:
        if self._queue and self._queue[0] is exchange:
            self._queue.popleft()
        if self._closed:
            return
        if not exchange.keep_alive:
            self.close()
            return
        self.idle_since = time.monotonic()
        if self._queue:
            if len(self._queue) == 1:
                self.resume_reading("queued")
            self.proxy.begin(self._queue[0])
        elif self._bad_request is not None:
            self._send_bad_request()
        elif self._eof:
            self.close()

    def _reject(self, status: int, message: str) -> None:
        """A request that cannot be served: the error once the earlier ones are answered,
        then close (the parser cannot find the next request's start)."""
        self._bad_request = (status, message)
        self.pause_reading("bad")
        if not self._queue:
            self._send_bad_request()

    def _send_bad_request(self) -> None:
        status, message = self._bad_request or (400, "bad request")
        self.write(error_response(status, message, close=True))
        self.close()

    # ---- tunnel ------------------------------------------------------------------------

    def start_tunnel(
        self, upstream: Upstream, rest: bytes, vm_id: str | None, opened: float | None
    ) -> None:
        """After a 101: bytes flow unparsed both ways until either side closes."""
        if self._queue:
            self._queue.popleft()
        if self._closed:
            upstream.close()
            return
        upstream.exchange = None
        upstream.tunnel = self
        self._peer = upstream
        if vm_id is not None and opened is not None:
            self._tunnel_activity = (vm_id, opened)
        if rest:
            self.write(rest)
        for early in self._tunnel_early:
            if early:
                upstream.write(early)
        self._tunnel_early.clear()
        if self.write_paused:
            upstream.pause_reading()
        self.resume_reading("upgrade")

    def peer_closed(self) -> None:
        self.close()

    def _end_tunnel_activity(self) -> None:
        if self._tunnel_activity is not None:
            self.proxy.activity.close(*self._tunnel_activity)
            self._tunnel_activity = None

    # ---- control -----------------------------------------------------------------------

    def write(self, data: bytes) -> None:
        if self.transport is not None and not self._closed:
            self.transport.write(data)

    def pause_reading(self, reason: str) -> None:
        if not self._paused and self.transport is not None and not self.transport.is_closing():
            self.transport.pause_reading()
        self._paused.add(reason)

    def resume_reading(self, reason: str) -> None:
        if reason not in self._paused:
            return
        self._paused.discard(reason)
        if not self._paused and self.transport is not None and not self.transport.is_closing():
            self.transport.resume_reading()

    @property
    def idle(self) -> bool:
        return not self._queue and self._peer is None

    def close(self) -> None:
        if self.transport is not None:
            self.transport.close()

    def abort(self) -> None:
        if self.transport is not None:
            self.transport.abort()
