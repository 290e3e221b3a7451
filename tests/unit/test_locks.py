"""KeyedLocks serialises per key, frees entries, and keeps other keys independent."""

import asyncio

from hatchvm.core.locks import KeyedLocks


async def test_same_key_serialises_other_keys_do_not() -> None:
    locks = KeyedLocks()
    order: list[str] = []
    b_ran = asyncio.Event()

    async def first() -> None:
        async with locks.hold("a"):
            order.append("1+")
            await b_ran.wait()  # holds "a" until the other key got through
            order.append("1-")

    async def second() -> None:
        async with locks.hold("a"):
            order.append("2+")
            order.append("2-")

    async def other_key() -> None:
        async with locks.hold("b"):
            order.append("3+")
        b_ran.set()

    await asyncio.wait_for(asyncio.gather(first(), second(), other_key()), 5)
    assert order.index("1-") < order.index("2+")  # same key: strictly one after the other
    assert order.index("3+") < order.index("1-")  # other key: not held up
    assert not locks.busy("a") and locks._locks == {}


async def test_held_if_free_never_waits() -> None:
    locks = KeyedLocks()
    async with locks.hold("a"):
        async with locks.held_if_free("a") as got:  # held: no deadlock, no wait
            assert got is False
    async with locks.held_if_free("a") as got:  # the positive control: free, so held now
        assert got is True
        assert locks.busy("a")
    assert not locks.busy("a")
