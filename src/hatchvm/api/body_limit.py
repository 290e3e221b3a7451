"""Limits on request bodies, enforced while the body arrives: 1 MiB for every JSON body, and
4 GiB for a file uploaded to a guest (PUT /vms/{id}/files, streamed through, never held).

A declared Content-Length over the limit is answered 413 from the request head alone, before
the handler runs or a byte of the body is read; a body of unknown length (chunked) is counted
as it arrives and cut off with 413 once it passes the limit. The server buffers at most one
flow-control window of body meanwhile (uvicorn pauses reading), so memory stays bounded.

An answer sent before a chunked body was read to its end says `Connection: close`: otherwise
the server would go on reading (and discarding) the rest of it to find the next request, for
as long as the client cares to send. An unread body of declared length is at most the limit,
and the HTTP parser skips it exactly, so such a connection stays reusable.
"""

from __future__ import annotations

import json
import re

from starlette.types import ASGIApp, Message, Receive, Scope, Send

from hatchvm.errors import PayloadTooLarge

MAX_BODY_BYTES = 1 << 20  # 1 MiB: the largest JSON body is a VM create with 64 KiB user_data
MAX_UPLOAD_BYTES = 4 << 30  # 4 GiB: a file uploaded to a guest
_UPLOAD = re.compile(r"^/vms/[^/]+/files$")


def limit_for(scope: Scope, default: int) -> int:
    if scope["method"] == "PUT" and _UPLOAD.match(scope["path"]):
        return MAX_UPLOAD_BYTES
    return default


def too_large_message(limit: int) -> str:
    return f"request body too large (max {limit} bytes)"


def _framing(scope: Scope) -> tuple[int | None, bool]:
    """The declared Content-Length (None if absent) and whether the body is chunked."""
    length, chunked = None, False
    for name, value in scope["headers"]:
        if name == b"content-length" and value.isdigit():
            # The HTTP parser has refused malformed or conflicting lengths before we see them.
            length = int(value)
        elif name == b"transfer-encoding":
            chunked = True
    return length, chunked and length is None


class BodyLimit:
    """Pure ASGI middleware (no buffering of its own), so it sees the body chunk by chunk."""

    def __init__(self, app: ASGIApp, max_bytes: int = MAX_BODY_BYTES) -> None:
        self.app = app
        self.max_bytes = max_bytes

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        limit = limit_for(scope, self.max_bytes)
        declared, chunked = _framing(scope)
        if declared is not None and declared > limit:
            await _send_413(send, limit)
            return
        received = 0
        ended = not chunked  # whether the connection may be reused after the answer

        async def limited_receive() -> Message:
            nonlocal received, ended
            message = await receive()
            if message["type"] == "http.request":
                received += len(message.get("body", b""))
                if received > limit:
                    raise PayloadTooLarge(too_large_message(limit))
                ended = ended or not message.get("more_body", False)
            return message

        async def closing_send(message: Message) -> None:
            if message["type"] == "http.response.start" and not ended:
                headers = [(k, v) for k, v in message.get("headers", []) if k != b"connection"]
                message = {**message, "headers": [*headers, (b"connection", b"close")]}
            await send(message)

        await self.app(scope, limited_receive, closing_send)


async def _send_413(send: Send, limit: int) -> None:
    body = json.dumps({"error": too_large_message(limit)}).encode()
    headers = [
        (b"content-type", b"application/json"),
        (b"content-length", str(len(body)).encode()),
        (b"connection", b"close"),
    ]
    await send({"type": "http.response.start", "status": 413, "headers": headers})
    await send({"type": "http.response.body", "body": body})
