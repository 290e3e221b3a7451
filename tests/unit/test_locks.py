"""KeyedLocks serialises per key, frees entries, and keeps other keys independent."""

import asyncio

from hatchvm.core.locks import KeyedLocks


async def test_same_key_serialises_other_keys_do_not() -> None:
    locks = KeyedLocks()
    order: list[str] = []

    async def work(key: str, name: str, delay: float) -> None:
        async with locks.hold(key):
            order.append(f"{name}+")
            await asyncio.sleep(delay)
            order.append(f"{name}-")

    await asyncio.gather(work("a", "1", 0.05), work("a", "2", 0), work("b", "3", 0))
    assert order.index("1-") < order.index("2+")  # same key: strictly one after the other
    assert order.index("3+") < order.index("1-")  # other key: not held up
    assert not locks.busy("a") and locks._locks == {}
