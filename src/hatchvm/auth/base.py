"""Who is calling: one verifier interface; the API asks it for the user behind a key."""

from __future__ import annotations

from typing import Any, Protocol

from fastapi import Request
from sqlalchemy.ext.asyncio import async_sessionmaker

from hatchvm.auth.better_auth import BetterAuthVerifier
from hatchvm.auth.local import LocalKeyVerifier
from hatchvm.config import Settings
from hatchvm.errors import Unauthorized


class Verifier(Protocol):
    name: str  # "local" or "better-auth", shown by /healthz

    async def verify(self, key: str) -> str:
        """Return the user id owning key; raise Unauthorized (or BackendUnavailable)."""
        ...

    async def close(self) -> None: ...


def build_verifier(settings: Settings, sessions: async_sessionmaker[Any]) -> Verifier:
    """Better Auth when HATCH_BETTER_AUTH_URL is set, else the local keys of the database."""
    if settings.better_auth_url:
        return BetterAuthVerifier(
            settings.better_auth_url, settings.better_auth_verify_url, settings.auth_cache_ttl
        )
    return LocalKeyVerifier(sessions)


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
