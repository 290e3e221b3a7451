"""Who is calling: one verifier interface; the API asks it for the user behind a key."""

from __future__ import annotations

from typing import Protocol

from fastapi import Request

from hatchvm.errors import Unauthorized


class Verifier(Protocol):
    async def verify(self, key: str) -> str:
        """Return the user id owning key; raise Unauthorized (or BackendUnavailable)."""
        ...


def key_from_request(request: Request) -> str:
    """The key from `Authorization: Bearer <key>` or `X-API-Key: <key>`."""
    auth = request.headers.get("authorization", "")
    scheme, _, value = auth.partition(" ")
    if scheme.lower() == "bearer" and value.strip():
        return value.strip()
    header = request.headers.get("x-api-key", "").strip()
    if header:
        return header
    raise Unauthorized("missing API key (Authorization: Bearer <key> or X-API-Key)")
