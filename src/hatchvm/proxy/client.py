"""One client connection to the proxy: parses its requests (each routed by its own Host header,
as an edge proxy reuses connections across hosts), answers them in order, applies back-pressure
both ways, and after a 101 becomes a plain byte tunnel to the guest. Its phase and its clock
(`since`) say how long it may wait for what (phases.py); the proxy's sweeper calls `expire`."""

from __future__ import annotations

import asyncio
from collections import deque
from time import monotonic
from typing import TYPE_CHECKING

import httptools
import structlog

from hatchvm.clients import address_key, parse_address
from hatchvm.proxy.exchange import Exchange
from hatchvm.proxy.headers import (
    HOP_BY_HOP,
    Headers,
    connection_tokens,
    error_response,
    head_size,
)
from hatchvm.proxy.phases import HEAD, IDLE, SENDING, STREAMING, TUNNEL, Phase
from hatchvm.proxy.upstream import Upstream, size

if TYPE_CHECKING:
    from hatchvm.proxy.server import Proxy

log = structlog.get_logger("hatchvm.proxy")

MAX_PIPELINED = 100  # requests parsed ahead of their answer; each holds its head in memory
MAX_REFUSED_LINGERING = 512  # refused connections given time to read their refusal


class ClientConnection(asyncio.Protocol):
    def __init__(self, proxy: Proxy) -> None:
        self.proxy = proxy
        self.transport: asyncio.Transport | None = None
        self.ip = b""
        self.trusted = False  # a trusted proxy: its X-Forwarded-* are believed
        self.write_paused = False
        self.since = monotonic()  # the last progress in the current phase
        self._closing_since: float | None = None
        self._lingering = False  # answered and half-closed: what the client sends is dropped
        self._refused = False
        self._key: str | None = None  # the address this connection counts against
        self._admitted = False
        self._slot: str | None = None  # trusted proxy: the client its current request is for
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
        self._fresh = True  # a new connection owes its first request head at once
        self._framing = 0  # bytes read since the last head, body piece or request end
        self._read = 0  # bytes of the current read
        self._max_head = proxy.max_head
        self._reset_head()

    def _reset_head(self) -> None:
        self._url = b""
        self._host: bytes | None = None
        self._headers: Headers = []
        self._dropped = HOP_BY_HOP
        self._upgrade: bytes | None = None
        self._chunked = False
        self._sized = False

    # ---- transport events ----------------------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]
        peer = transport.get_extra_info("peername")
        text = str(peer[0]) if peer else ""
        self.ip = text.encode() or b"unknown"
        proxy = self.proxy
        address = parse_address(text)
        self.trusted = address is not None and proxy.trusts(address)
        key = None if self.trusted or address is None else address_key(address)
        refusal = proxy.admission.admit(key)
        if refusal is None:
            self._key, self._admitted = key, True
            proxy.connections.add(self)
            return
        proxy.refused(refusal[0], key or text)
        if proxy.refused_lingering >= MAX_REFUSED_LINGERING:  # a flood: no answer, no linger
            transport.abort()  # type: ignore[attr-defined]
            return
        self._refused = True
        proxy.refused_lingering += 1
        proxy.connections.add(self)  # only for the sweeper, which ends the linger
        self.write(error_response(*refusal, close=True))
        self.close(answered=True)

    def data_received(self, data: bytes) -> None:
        if self._peer is not None:
            self._peer.write(data)
            return
        if self._lingering:
            return
        if "upgrade" in self._paused:  # an upgrade request awaits the guest's answer
            self._tunnel_early.append(data)
            self.pause_reading("upgrade")
            return
        if not self._framing and not self._queue and not self._fresh:
            self.since = monotonic()  # the first byte of the next head: its clock starts
        self._read = n = len(data)
        self._framing += n
        try:
            self._parser.feed_data(data)
        except httptools.HttpParserUpgrade as upgrade:
            self._tunnel_early.append(data[upgrade.args[0] :])
            self.pause_reading("upgrade")
            return
        except httptools.HttpParserCallbackError as exc:
            if self._bad_request is None:  # a bug of ours, not the client's: keep the trace
                log.error("proxy request handling failed", exc_info=exc.__context__)
                self._reject(500, "internal error")
            else:
                self._reject(*self._bad_request)  # one of our callbacks refused the request
            return
        except httptools.HttpParserError as exc:
            self._reject(400, f"malformed request: {exc}")
            return
        if self._framing > self._max_head:
            # httptools keeps an unfinished header line to itself: only the reads show it.
            if self._incoming is None:  # in a head
                self._reject(431, f"request head larger than {size(self._max_head)}")
            else:  # endless chunk extensions or trailers: nothing sane can follow
                self.abort()

    def eof_received(self) -> bool:
        if self._lingering:
            return False  # the client read our last answer and left: close
        if self._peer is not None and self._peer.transport is not None:
            if self._peer.transport.can_write_eof():
                self._peer.transport.write_eof()
                return True  # half-close: the guest may still answer
        self._eof = True
        # Answer what was fully asked before closing; a half-sent request never completes.
        return bool(self._queue) and self._incoming is None

    def connection_lost(self, exc: Exception | None) -> None:
        self._closed = True
        if self._admitted:
            self._admitted = False
            self.proxy.admission.release(self._key)
        if self._refused:
            self._refused = False
            self.proxy.refused_lingering -= 1
        self._release_slot()
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

    def on_header(self, name: bytes, value: bytes) -> None:
        self._headers.append((name, value))
        low = name.lower()
        if low == b"connection":
            self._dropped = self._dropped | connection_tokens(value)
        elif low == b"host":
            if self._host is not None:  # which one would the guest believe? (RFC 9112 3.2)
                self._refuse(400, "more than one Host header")
            self._host = value
        elif low == b"upgrade":
            self._upgrade = value
        elif low == b"transfer-encoding":
            self._chunked = True
        elif low == b"content-length":
            self._sized = value.strip() not in (b"", b"0")

    def on_headers_complete(self) -> None:
        limit = self._max_head  # the bytes read bound the head: summed only when over
        if (self._framing > limit or self._read > limit) and (
            len(self._url) + head_size(self._headers) > limit
        ):
            self._refuse(431, f"request head larger than {size(limit)}")
        self._fresh = False
        self._framing = 0
        parser = self._parser
        method = parser.get_method()
        if method == b"CONNECT":
            self._refuse(400, "CONNECT is not supported: this is a reverse proxy")
        queue = self._queue
        if len(queue) >= MAX_PIPELINED:
            self._refuse(400, f"more than {MAX_PIPELINED} requests sent ahead of their answers")
        exchange = Exchange(
            self,
            method,
            self._url,
            self._headers,
            self._dropped,
            http11=parser.get_http_version() == "1.1",
            keep_alive=parser.should_keep_alive(),
            chunked=self._chunked,
            has_body=self._chunked or self._sized,
            upgrade=self._upgrade if parser.should_upgrade() else None,
        )
        exchange.host = self._host or b""
        self._reset_head()
        self._incoming = exchange
        queue.append(exchange)
        if len(queue) > 1:
            self.pause_reading("queued")  # pipelined: one at a time, in order
        elif self.trusted:
            self._serve_forwarded(exchange)
        else:
            self.proxy.begin(exchange)

    def on_body(self, body: bytes) -> None:
        self._framing = 0
        if self._incoming is not None:
            self._incoming.request_body(body)

    def on_message_complete(self) -> None:
        self._framing = 0
        if self._headers:  # trailers (not forwarded): never the next request's headers
            self._reset_head()
        if self._incoming is not None:
            self._incoming.request_done()
            self._incoming = None

    def _refuse(self, status: int, message: str) -> None:
        self._bad_request = (status, message)
        raise httptools.HttpParserError(message)  # stops the parse; data_received answers

    # ---- exchanges -------------------------------------------------------------------------

    def _serve_forwarded(self, exchange: Exchange) -> None:
        """Start the exchange at the front of a trusted proxy's queue: each request counts
        against the client it is for, until it is answered (or its tunnel closes)."""
        key = self.proxy.forwarded_key(exchange.headers) or self.ip.decode()
        refusal = self.proxy.admission.enter(key)
        if refusal is not None:
            self.proxy.refused(refusal[0], key)
            exchange.fail(*refusal)
            return
        self._slot = key
        self.proxy.begin(exchange)

    def _release_slot(self) -> None:
        if self._slot is not None:
            self.proxy.admission.leave(self._slot)
            self._slot = None

    def exchange_finished(self, exchange: Exchange) -> None:
        queue = self._queue
        if queue and queue[0] is exchange:
            queue.popleft()
        if self._slot is not None:
            self._release_slot()
        if self._closed:
            return
        if not exchange.keep_alive:
            self.close(answered=True)
            return
        self.since = monotonic()
        if queue:
            if len(queue) == 1:
                self.resume_reading("queued")
            if self.trusted:
                self._serve_forwarded(queue[0])
            else:
                self.proxy.begin(queue[0])
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
        # A request all the same, answered by the proxy; timed from the head's last progress.
        self.proxy.requests.observe(status, True, monotonic() - self.since)
        self.write(error_response(status, message, close=True))
        self.close(answered=True)

    # ---- tunnel ------------------------------------------------------------------------

    def start_tunnel(
        self, upstream: Upstream, rest: bytes, vm_id: str | None, opened: float | None
    ) -> None:
        """After a 101: bytes flow unparsed both ways until either side closes."""
        if self._queue:
            self._queue.popleft()
        if self._closed:
            upstream.close()
            self._release_slot()
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
        self.since = monotonic()  # whatever held the request back has moved
        self._paused.discard(reason)
        if not self._paused and self.transport is not None and not self.transport.is_closing():
            self.transport.resume_reading()

    # ---- the clock ---------------------------------------------------------------------

    @property
    def phase(self) -> Phase:
        if self._peer is not None:
            return TUNNEL
        if self._queue:
            return self._queue[0].phase
        return HEAD if self._fresh or self._framing else IDLE

    def _client_stalls(self, phase: Phase) -> bool:
        """In flight: is it the client that holds the exchange up (rather than the guest)?"""
        if phase is SENDING:
            return "upstream" not in self._paused  # unless the guest stopped reading the body
        return phase is STREAMING and self.write_paused  # the client reads no more

    def expire(self, now: float) -> None:
        """Close or answer what has waited longer than its phase allows (phases.Timeouts)."""
        timeouts = self.proxy.timeouts
        if self._closing_since is not None:
            transport = self.transport
            if transport is not None and transport.get_write_buffer_size():
                if now - self.since > timeouts.client:
                    self.abort()  # the client does not take the rest
            elif now - self._closing_since > timeouts.linger and transport is not None:
                transport.close()
            return
        phase = self.phase
        stalls = self._client_stalls(phase)
        limit = timeouts.of(phase, stalls)
        if limit is None or now - self.since <= limit:
            return
        self.proxy.timed_out(phase, self._key or self.ip.decode())
        if phase is IDLE:
            self.close()
        elif phase is HEAD:
            began = self._framing > 0  # a silent connection gets no answer, only a close
            if began:
                message = f"request head not received within {limit:g}s"
                self.write(error_response(408, message, close=True))
            self.close(answered=began)
        else:
            self._queue[0].timed_out(stalls, limit)

    def close(self, answered: bool = False) -> None:
        """answered: an answer was just written, and the client may still be sending (a body
        we will not read, its next request). A close with unread input makes the kernel send
        a reset, which can destroy that answer before the client reads it: half-close, drop
        what comes, and close when the client does or the linger ends (RFC 9112 9.6)."""
        if self._closing_since is None:
            self._closing_since = self.since = monotonic()
        transport = self.transport
        if transport is None or transport.is_closing() or self._lingering:
            return
        if answered and not self._eof and self._peer is None and transport.can_write_eof():
            self._lingering = True
            transport.write_eof()
            self._paused.clear()
            transport.resume_reading()
            return
        transport.close()

    def abort(self) -> None:
        if self.transport is not None:
            self.transport.abort()
