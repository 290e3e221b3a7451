"""API keys verified against a Better Auth server (its API-key plugin); the key's owner, Better
Auth's user id, is the caller.

Two ways to ask, as the contract has them:
- the verify route (HATCH_BETTER_AUTH_VERIFY_URL): POST {"key"} -> {"valid", "userId"};
- Better Auth's own GET /api/auth/get-session with the `x-api-key` header (the plugin's
  `enableSessionForAPIKeys`): the key owner's session, or null.

The answer is cached (auth/cache.py) so Better Auth sees a key about once per TTL. Nothing of a
key reaches a log line or an error message: get-session's answer even echoes the key
(session.token), so answers are read for the user id and never logged.
"""

from __future__ import annotations

import asyncio
from typing import Any

import httpx
import structlog

from hatchvm.auth.cache import VerificationCache, key_digest
from hatchvm.errors import BackendUnavailable, Unauthorized

log = structlog.get_logger("hatchvm.auth")

SESSION_PATH = "/api/auth/get-session"
REQUEST_TIMEOUT = 5.0  # seconds for one call to Better Auth, connecting included
MAX_IN_FLIGHT = 16  # concurrent verifications: a flood of new keys queues here
MAX_ANSWER_BYTES = 64 << 10


class _Refused(Exception):
    """Better Auth says the key is not valid."""


class _Unusable(Exception):
    """Better Auth could not be asked or gave an answer that cannot be used."""


class BetterAuthVerifier:
    name = "better-auth"

    def __init__(
        self,
        base_url: str,
        verify_url: str = "",
        cache_ttl: float = 30.0,
        timeout: float = REQUEST_TIMEOUT,
        transport: httpx.AsyncBaseTransport | None = None,
    ) -> None:
        self.base_url = base_url.rstrip("/")
        self.verify_url = verify_url
        self._cache = VerificationCache(cache_ttl)
        self._slots = asyncio.Semaphore(MAX_IN_FLIGHT)
        self._http = httpx.AsyncClient(
            timeout=httpx.Timeout(timeout),
            follow_redirects=False,
            transport=transport,
            headers={"accept": "application/json"},
        )

    @property
    def server(self) -> str:
        """How errors name the auth server (never the key)."""
        return self.verify_url or self.base_url + SESSION_PATH

    async def close(self) -> None:
        await self._http.aclose()

    async def verify(self, key: str) -> str:
        user = await self._cache.get_or_load(key_digest(key), lambda: self._ask(key))
        if user is None:
            raise Unauthorized("invalid API key")
        return user

    async def _ask(self, key: str) -> str | None:
        """The key's owner, or None when Better Auth refuses the key. Raises
        BackendUnavailable when it cannot be asked; such failures are not cached."""
        async with self._slots:
            try:
                if self.verify_url:
                    return await self._ask_verify_route(key)
                return await self._ask_session(key)
            except _Refused:
                return None
            except _Unusable as exc:
                log.warning("auth server unusable", server=self.server, reason=str(exc))
                raise BackendUnavailable(
                    f"the auth server {self.server} cannot verify API keys right now: {exc}"
                ) from None

    async def _call(self, method: str, url: str, **kwargs: Any) -> Any:
        try:
            response = await self._http.request(method, url, **kwargs)
        except httpx.TimeoutException:
            raise _Unusable("no answer in time") from None
        except httpx.HTTPError as exc:
            raise _Unusable(f"unreachable ({type(exc).__name__})") from None
        if response.status_code in (401, 403):
            raise _Refused
        if response.status_code != 200:
            raise _Unusable(f"it answered HTTP {response.status_code}")
        if len(response.content) > MAX_ANSWER_BYTES:
            raise _Unusable("its answer is too large")
        try:
            return response.json()
        except ValueError:
            raise _Unusable("its answer is not JSON") from None

    async def _ask_verify_route(self, key: str) -> str:
        answer = await self._call("POST", self.verify_url, json={"key": key})
        if not isinstance(answer, dict) or not isinstance(answer.get("valid"), bool):
            raise _Unusable('its answer has no boolean "valid"')
        if not answer["valid"]:
            raise _Refused
        return _user_id(answer.get("userId"))

    async def _ask_session(self, key: str) -> str:
        answer = await self._call("GET", self.base_url + SESSION_PATH, headers={"x-api-key": key})
        if answer is None:
            raise _Refused  # no session for this key
        if not isinstance(answer, dict) or not isinstance(answer.get("user"), dict):
            raise _Unusable('its answer is neither null nor a session with a "user"')
        return _user_id(answer["user"].get("id"))


def _user_id(value: object) -> str:
    if not isinstance(value, str) or not value.strip() or len(value) > 128:
        raise _Unusable("its answer has no usable user id")
    return value
