"""One request and its response through the proxy. The client connection parses the request
and feeds it here; the upstream connection parses the response and feeds it here; this object
turns each side's framing into the other's (re-chunking when lengths are unknown) and decides
whether both connections can be reused afterwards.

Its life is one `Phase` (phases.py): QUEUED -> CONNECTING -> SENDING -> WAITING -> STREAMING
-> DONE, or TUNNEL after a 101. The response may start while the request body still arrives
(SENDING -> STREAMING); `body_done` records the request side's end on its own.
"""

from __future__ import annotations

from time import monotonic
from typing import TYPE_CHECKING

from hatchvm.proxy.headers import (
    LAST_CHUNK,
    Headers,
    chunk,
    end_to_end,
    error_response,
    request_head,
    response_head,
)
from hatchvm.proxy.phases import (
    CONNECTING,
    DONE,
    QUEUED,
    SENDING,
    STREAMING,
    TUNNEL,
    WAITING,
    Phase,
)
from hatchvm.proxy.upstream import PoolKey, Upstream

if TYPE_CHECKING:
    import asyncio

    from hatchvm.proxy.client import ClientConnection


class Exchange:
    def __init__(
        self,
        client: ClientConnection,
        method: bytes,
        target: bytes,
        headers: Headers,
        dropped: frozenset[bytes],
        *,
        http11: bool,
        keep_alive: bool,
        chunked: bool,
        has_body: bool,
        upgrade: bytes | None,
    ) -> None:
        self.client = client
        self.method = method
        self.target = target
        self.headers = headers
        self.dropped = dropped
        self.http11 = http11
        self.keep_alive = keep_alive and http11  # HTTP/1.0 clients get one request each
        self.chunked = chunked  # the request body arrives (and leaves) chunked
        self.has_body = has_body
        self.upgrade = upgrade  # the Upgrade header of an upgrade request
        self.host = b""
        self.phase: Phase = QUEUED
        self.body: list[bytes] = []  # request body received before an upstream is attached
        self.body_done = False
        self.upstream: Upstream | None = None
        self.key: PoolKey | None = None
        self.vm_id: str | None = None
        self.opened: float | None = None  # activity: this exchange keeps its VM busy
        self.task: asyncio.Task[None] | None = None  # waking the VM or connecting
        self.retried = False
        self.chunked_out = False
        self.until_close = False  # the upstream body ends when its connection does
        # Counted when the exchange ends (metrics/requests.py): how long, what answer, whose.
        self.began = monotonic()
        self.status = 0  # none yet
        self.by_proxy = False

    # Every change of phase restarts the connection's clock (client.since), inline: this is
    # the per-request path, where a method call costs more than the assignment.

    # ---- request side ------------------------------------------------------------------

    def attach(self, upstream: Upstream, key: PoolKey, vm_id: str) -> None:
        client = self.client
        if self.phase is DONE:  # the client left while we connected
            client.proxy.pool.put(upstream)
            return
        self.upstream, self.key, self.vm_id = upstream, key, vm_id
        upstream.exchange = self
        self.phase = WAITING if self.body_done else SENDING
        client.since = monotonic()
        if self.opened is None:
            self.opened = client.proxy.activity.open(vm_id)
        upstream.write(
            request_head(
                self.method,
                self.target,
                self.headers,
                self.dropped,
                client.ip,
                trusted=client.trusted,
                chunked=self.chunked,
                upgrade=self.upgrade,
            )
        )
        for piece in self.body:
            self._send_body(upstream, piece)
        self.body.clear()
        if self.body_done and self.chunked:
            upstream.write(LAST_CHUNK)
        if client.write_paused:
            upstream.pause_reading()
        client.resume_reading("waiting")

    def request_body(self, data: bytes) -> None:
        if self.phase is DONE:
            return
        self.client.since = monotonic()
        if self.upstream is None:
            self.body.append(data)
            self.client.pause_reading("waiting")  # at most one read buffered per request
        else:
            self._send_body(self.upstream, data)

    def _send_body(self, upstream: Upstream, data: bytes) -> None:
        upstream.write(chunk(data) if self.chunked else data)

    def request_done(self) -> None:
        self.body_done = True
        if self.phase is SENDING:
            self.phase = WAITING
            if self.has_body:  # else attach() started the clock a moment ago
                self.client.since = monotonic()
        if self.chunked and self.upstream is not None and self.phase is not DONE:
            self.upstream.write(LAST_CHUNK)

    # ---- response side -----------------------------------------------------------------

    def response_head(self, status: int, reason: bytes, headers: Headers) -> None:
        if self.phase is DONE:
            return
        self.status = status
        kept, chunked, sized = end_to_end(headers)
        if status < 200:
            if status != 101:
                if self.http11:  # no 1xx to an HTTP/1.0 client (RFC 9110 15.2)
                    self.client.write(response_head(status, reason, kept, b""))
            elif self.upgrade is None:
                self.fail(502, "the target switched protocols unasked")
            else:
                protocol = next((v for n, v in headers if n.lower() == b"upgrade"), self.upgrade)
                self.phase = TUNNEL
                self.client.since = monotonic()
                extra = b"Connection: Upgrade\r\nUpgrade: %b\r\n" % protocol
                self.client.write(response_head(101, reason, kept, extra))
            return
        if self.upgrade is not None:
            self.keep_alive = False  # the client's parser took the upgrade: start afresh
        extra = b""
        if not (self.method == b"HEAD" or status in (204, 304)) and (chunked or not sized):
            self.until_close = not chunked
            if self.http11:
                self.chunked_out = True
                extra = b"Transfer-Encoding: chunked\r\n"
            else:
                self.keep_alive = False  # HTTP/1.0: the end of the body is the close
        if not self.keep_alive:
            extra += b"Connection: close\r\n"
        self.phase = STREAMING
        client = self.client
        client.since = monotonic()
        client.write(response_head(status, reason, kept, extra))

    def response_body(self, data: bytes) -> None:
        if self.phase is STREAMING:
            client = self.client
            client.since = monotonic()
            client.write(chunk(data) if self.chunked_out else data)

    def response_done(self, upstream_keep_alive: bool) -> None:
        # SENDING or WAITING: that was a 1xx, the final answer follows; TUNNEL: the 101's end.
        if self.phase is not STREAMING:
            return
        if self.chunked_out:
            self.client.write(LAST_CHUNK)
        upstream, self.upstream = self.upstream, None
        if upstream is not None:
            if upstream_keep_alive and self.body_done and not self.until_close:
                self.client.proxy.pool.put(upstream)
            else:
                upstream.close()
        if not self.body_done:
            self.keep_alive = False  # answered early: the rest of the body is not read
        self.finish()

    def upstream_switched(self, upstream: Upstream, rest: bytes) -> None:
        if self.phase is not TUNNEL:
            upstream.close()
            self.fail(502, "the target switched protocols unasked")
            return
        self.upstream = None
        self.phase = DONE  # the connection carries on as a tunnel
        self._record()
        opened, self.opened = self.opened, None
        self.client.start_tunnel(upstream, rest, self.vm_id, opened)

    # ---- failures ----------------------------------------------------------------------

    def upstream_lost(self, upstream: Upstream, exc: Exception | None) -> None:
        if self.phase is DONE or upstream is not self.upstream:
            return
        self.upstream = None
        if self.phase is STREAMING and self.until_close and exc is None:
            if self.chunked_out:
                self.client.write(LAST_CHUNK)
            self.finish()
        elif upstream.reused and not upstream.received and not self.has_body and not self.retried:
            # A kept-alive connection the guest had closed: safe to send it again, once.
            self.retried = True
            self.phase = CONNECTING
            self.client.proxy.reconnect(self)
        else:
            reason = f": {exc}" if exc else ""
            self.fail(502, f"the target closed the connection{reason}")

    def timed_out(self, client_stalled: bool, seconds: float) -> None:
        """The sweeper's verdict: nothing moved for `seconds` (phases.Timeouts)."""
        if client_stalled:
            self.fail(408, f"the client sent or read nothing for {seconds:g}s")
        elif self.phase is SENDING:
            self.fail(504, f"the target read none of the request for {seconds:g}s")
        elif self.phase is WAITING:
            self.fail(504, f"the target sent no response within {seconds:g}s")
        else:
            self.fail(504, f"the target sent nothing for {seconds:g}s")

    def fail(self, status: int, message: str) -> None:
        """Answer with a JSON error; past the response head, cut the client off instead.
        A guest connection still attached is dropped: where its exchange stands is unknown."""
        phase = self.phase
        if phase is DONE:
            return
        upstream, self.upstream = self.upstream, None
        if upstream is not None:
            upstream.abort()
        if phase in (STREAMING, TUNNEL):
            self.phase = DONE
            self._release_activity()
            self._record()  # as the guest's answer began: its head is what the client saw
            self.client.abort()
            return
        if not self.body_done or self.upgrade is not None:
            self.keep_alive = False
        self.status, self.by_proxy = status, True
        self.client.write(error_response(status, message, close=not self.keep_alive))
        self.finish()

    def client_gone(self) -> None:
        if self.phase is DONE:
            return
        self.phase = DONE
        if self.task is not None:
            self.task.cancel()  # the wait ends; a shared wake goes on for the others
        self.by_proxy = self.upstream is None  # unanswered: left waiting for us or the guest?
        if self.upstream is not None:
            self.upstream.abort()  # mid-exchange: that connection cannot be reused
            self.upstream = None
        self._release_activity()
        self._record()

    def finish(self) -> None:
        self.phase = DONE
        self._release_activity()
        self._record()
        self.client.exchange_finished(self)

    def _record(self) -> None:
        self.client.proxy.requests.observe(self.status, self.by_proxy, monotonic() - self.began)

    def _release_activity(self) -> None:
        if self.opened is not None and self.vm_id is not None:
            self.client.proxy.activity.close(self.vm_id, self.opened)
            self.opened = None
