"""One asyncio lock per VM (and per user for quota checks), created on first use."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager


class KeyedLocks:
    """Locks by key; an entry is dropped when nobody holds or waits for it."""

    def __init__(self) -> None:
        self._locks: dict[str, asyncio.Lock] = {}
        self._users: dict[str, int] = {}

    @asynccontextmanager
    async def hold(self, key: str) -> AsyncIterator[None]:
        lock = self._locks.setdefault(key, asyncio.Lock())
        self._users[key] = self._users.get(key, 0) + 1
        try:
            async with lock:
                yield
        finally:
            self._users[key] -= 1
            if self._users[key] == 0:
                del self._users[key]
                del self._locks[key]

    @asynccontextmanager
    async def held_if_free(self, key: str) -> AsyncIterator[bool]:
        """Hold the key's lock if nobody holds or waits for it (True), else do nothing
        (False). Never waits, so a holder of other locks may call it without risking a
        deadlock: a lock nobody uses is a new one, taken at once."""
        if key in self._locks:
            yield False
            return
        async with self.hold(key):
            yield True

    def busy(self, key: str) -> bool:
        return key in self._locks and self._locks[key].locked()
