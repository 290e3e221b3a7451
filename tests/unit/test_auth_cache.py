"""The key verification cache: TTLs, one verification for concurrent askers, no caching of
failures, bounded size."""

from __future__ import annotations

import asyncio

import pytest

from hatchvm.auth.cache import VerificationCache, key_digest
from hatchvm.errors import BackendUnavailable


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


class Loader:
    """Answers with `user` (None: refused) or raises `error`; counts calls."""

    def __init__(self, user: str | None = "u1") -> None:
        self.user = user
        self.error: Exception | None = None
        self.calls = 0
        self.gate: asyncio.Event | None = None

    async def __call__(self) -> str | None:
        self.calls += 1
        if self.gate is not None:
            await self.gate.wait()
        if self.error is not None:
            raise self.error
        return self.user


async def test_a_known_key_is_asked_once_per_ttl() -> None:
    clock, load = Clock(), Loader("alice")
    cache = VerificationCache(30, clock=clock)
    assert await cache.get_or_load("k", load) == "alice"
    clock.now += 29.9
    assert await cache.get_or_load("k", load) == "alice"
    assert load.calls == 1
    clock.now += 0.2  # past the TTL: asked again
    assert await cache.get_or_load("k", load) == "alice"
    assert load.calls == 2


async def test_a_refused_key_is_kept_briefly() -> None:
    clock, load = Clock(), Loader(None)
    cache = VerificationCache(30, clock=clock)
    assert await cache.get_or_load("bad", load) is None
    assert await cache.get_or_load("bad", load) is None
    assert load.calls == 1
    clock.now += cache.negative_ttl + 0.1
    assert cache.negative_ttl < cache.ttl
    assert await cache.get_or_load("bad", load) is None
    assert load.calls == 2


async def test_concurrent_first_uses_share_one_verification() -> None:
    load = Loader("alice")
    load.gate = asyncio.Event()
    cache = VerificationCache(30)
    askers = [asyncio.create_task(cache.get_or_load("k", load)) for _ in range(50)]
    await asyncio.sleep(0)  # every asker is now waiting on the one verification
    load.gate.set()
    assert await asyncio.gather(*askers) == ["alice"] * 50
    assert load.calls == 1


async def test_an_asker_that_gives_up_does_not_cancel_the_others() -> None:
    load = Loader("alice")
    load.gate = asyncio.Event()
    cache = VerificationCache(30)
    quitter = asyncio.create_task(cache.get_or_load("k", load))
    stayer = asyncio.create_task(cache.get_or_load("k", load))
    await asyncio.sleep(0)
    quitter.cancel()
    load.gate.set()
    assert await stayer == "alice"
    assert load.calls == 1


async def test_failures_are_not_cached_and_expired_answers_are_not_served() -> None:
    clock, load = Clock(), Loader("alice")
    cache = VerificationCache(30, clock=clock)
    assert await cache.get_or_load("k", load) == "alice"
    clock.now += 31  # expired, and now the auth server is down: no grace period
    load.error = BackendUnavailable("auth server down")
    for _ in range(2):
        with pytest.raises(BackendUnavailable):
            await cache.get_or_load("k", load)
    assert load.calls == 3  # each request asks again: a failure is not remembered
    load.error = None
    assert await cache.get_or_load("k", load) == "alice"


async def test_ttl_zero_asks_every_time() -> None:
    load = Loader("alice")
    cache = VerificationCache(0)
    for _ in range(3):
        assert await cache.get_or_load("k", load) == "alice"
    assert load.calls == 3 and len(cache) == 0


async def test_the_cache_is_bounded() -> None:
    cache = VerificationCache(30, max_entries=100)
    for i in range(250):
        await cache.get_or_load(f"k{i}", Loader(None))
    assert len(cache) == 100


def test_the_digest_does_not_contain_the_key() -> None:
    key = "hatch_" + "s3cr3t" * 8
    digest = key_digest(key)
    assert len(digest) == 64 and "s3cr3t" not in digest and digest == key_digest(key)
