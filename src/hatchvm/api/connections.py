"""A guard on the API's listener against clients that hold connections.

uvicorn bounds neither how many connections it holds nor how long a request head may take: a
client that opens connections and sends nothing, or a byte now and then, holds each one (and
a file descriptor) for good, until hatchd can open nothing more: no VM, disk or database file.
Here every connection counts against a total and a per-client limit (the proxy's rules and
answers: 503 and 429 beyond them), and each request head must arrive within a deadline counted
from the connection's start or from the end of the previous response (408 after it). What
uvicorn would log a line for each time a client sends a bad request is counted instead.
"""

from __future__ import annotations

import asyncio
import logging

import structlog
from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol

from hatchvm.clients import address_key, parse_address
from hatchvm.logsummary import RepeatLog
from hatchvm.proxy.headers import error_response
from hatchvm.proxy.limits import Admission

log = structlog.get_logger("hatchvm.api")

# What uvicorn logs, a line each time, about a client's bad request: any client could fill
# the log with them. They are counted and logged once a minute instead.
_CLIENT_FAULTS = {
    "Invalid HTTP request received.": "invalid request",
    "Unsupported upgrade request.": "upgrade request",
}
_NO_WEBSOCKET_LIBRARY = "No supported WebSocket library detected"  # advice for no one here


class _ClientFaults(logging.Filter):
    def __init__(self) -> None:
        super().__init__()
        self.repeats = RepeatLog(log, "api clients sent bad requests", interval=60.0)

    def filter(self, record: logging.LogRecord) -> bool:
        message = record.getMessage()
        kind = _CLIENT_FAULTS.get(message)
        if kind is not None:
            self.repeats.note(kind)
            return False
        return not message.startswith(_NO_WEBSOCKET_LIBRARY)


_client_faults = _ClientFaults()


def _answer(transport: asyncio.Transport, status: int, message: str) -> None:
    """A JSON error, as the API's own (and the proxy's), then the connection's end."""
    transport.write(error_response(status, message, close=True))
    transport.close()


def guarded_protocol(admission: Admission, head_timeout: float) -> type[HttpToolsProtocol]:
    """uvicorn's HTTP protocol with the guard, for uvicorn.Config(http=...)."""
    uvicorn_log = logging.getLogger("uvicorn.error")
    if _client_faults not in uvicorn_log.filters:
        uvicorn_log.addFilter(_client_faults)
    refusals = RepeatLog(log, "api refused connections", interval=60.0)
    timeouts = RepeatLog(log, "api timed out request heads", interval=60.0)

    class GuardedProtocol(HttpToolsProtocol):
        _counted = False
        _key: str | None = None
        _head_timer: asyncio.TimerHandle | None = None

        def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
            super().connection_made(transport)
            address = parse_address(self.client[0]) if self.client else None
            self._key = None if address is None else address_key(address)
            refusal = admission.admit(self._key)
            if refusal is not None:
                refusals.note(str(refusal[0]), self._key or "", reason=refusal[1])
                _answer(transport, *refusal)
                return
            self._counted = True
            self._arm()

        def on_headers_complete(self) -> None:
            self._disarm()  # the head is in: from here on the request's own handling rules
            super().on_headers_complete()

        def on_response_complete(self) -> None:
            super().on_response_complete()
            if not self.transport.is_closing():
                self._arm()  # the next request head has the same deadline

        def handle_websocket_upgrade(self) -> None:
            # The connection goes to another protocol object, which never calls ours back:
            # its slot is given back now. (hatchd's API serves no WebSocket: ws="none".)
            self._release()
            super().handle_websocket_upgrade()

        def connection_lost(self, exc: Exception | None) -> None:
            self._release()
            super().connection_lost(exc)

        def _release(self) -> None:
            self._disarm()
            if self._counted:
                self._counted = False
                admission.release(self._key)

        def _arm(self) -> None:
            self._disarm()
            self._head_timer = self.loop.call_later(head_timeout, self._head_late)

        def _disarm(self) -> None:
            if self._head_timer is not None:
                self._head_timer.cancel()
                self._head_timer = None

        def _head_late(self) -> None:
            self._head_timer = None
            if self.cycle is not None and not self.cycle.response_complete:
                return  # a request is being answered (its head came in): not ours to cut
            timeouts.note("408", self._key or "")
            _answer(
                self.transport, 408, f"no complete request head within {head_timeout:g} seconds"
            )

    return GuardedProtocol
