"""Token buckets by key (a source address): `burst` at once, then `rate` per second."""

from __future__ import annotations

import time

MAX_KEYS = 10_000  # buckets kept before the full (idle) ones are forgotten


class TokenBuckets:
    def __init__(self, rate: float, burst: int) -> None:
        self.rate = rate
        self.burst = float(burst)
        self._buckets: dict[str, tuple[float, float]] = {}  # key -> (tokens, when)

    def take(self, key: str, now: float | None = None) -> bool:
        """One token from key's bucket; False when it is empty."""
        now = time.monotonic() if now is None else now
        tokens, then = self._buckets.get(key, (self.burst, now))
        tokens = min(self.burst, tokens + (now - then) * self.rate)
        if tokens < 1.0:
            self._buckets[key] = (tokens, now)
            return False
        self._buckets[key] = (tokens - 1.0, now)
        if len(self._buckets) > MAX_KEYS:
            self._forget_full(now)
        return True

    def _forget_full(self, now: float) -> None:
        """A bucket that has refilled is the same as no bucket."""
        for key, (tokens, then) in list(self._buckets.items()):
            if tokens + (now - then) * self.rate >= self.burst:
                del self._buckets[key]
