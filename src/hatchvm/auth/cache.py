"""A short-lived cache of key verifications, keyed by a hash of the key (never the key).

- A known key's owner is kept for the TTL; an unknown key's refusal for a shorter time (a
  client retrying a bad key does not become a flood against the auth server).
- Concurrent first uses of one key share one verification.
- Failures to verify (auth server down) are not kept: the next request asks again, and an
  entry past its TTL is never served instead (no grace period).
- Bounded: the oldest entries go first when it is full.
"""

from __future__ import annotations

import asyncio
import hashlib
import time
from collections import OrderedDict
from collections.abc import Awaitable, Callable

MAX_ENTRIES = 10_000
NEGATIVE_TTL = 5.0  # seconds an unknown key's refusal is kept (at most the TTL)

Loader = Callable[[], Awaitable[str | None]]


def key_digest(key: str) -> str:
    return hashlib.sha256(key.encode()).hexdigest()


class VerificationCache:
    def __init__(
        self,
        ttl: float,
        max_entries: int = MAX_ENTRIES,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.ttl = ttl
        self.negative_ttl = min(ttl, NEGATIVE_TTL)
        self._max = max_entries
        self._clock = clock
        self._entries: OrderedDict[str, tuple[float, str | None]] = OrderedDict()
        self._loading: dict[str, asyncio.Future[str | None]] = {}

    def __len__(self) -> int:
        return len(self._entries)

    async def get_or_load(self, digest: str, load: Loader) -> str | None:
        """The cached owner (None: a refused key), or load() once for all concurrent askers."""
        entry = self._entries.get(digest)
        if entry is not None:
            expires, user = entry
            if self._clock() < expires:
                return user
            del self._entries[digest]
        pending = self._loading.get(digest)
        if pending is None:
            pending = asyncio.ensure_future(self._load(digest, load))
            # Retrieved here, so a failure nobody waits for any more is not reported as lost.
            pending.add_done_callback(lambda f: f.cancelled() or f.exception())
            self._loading[digest] = pending
        # shield: one asker that gives up does not cancel the verification for the others.
        return await asyncio.shield(pending)

    async def _load(self, digest: str, load: Loader) -> str | None:
        try:
            user = await load()
        finally:
            del self._loading[digest]
        ttl = self.ttl if user is not None else self.negative_ttl
        if ttl > 0:
            self._entries[digest] = (self._clock() + ttl, user)
            self._entries.move_to_end(digest)
            while len(self._entries) > self._max:
                self._entries.popitem(last=False)
        return user
