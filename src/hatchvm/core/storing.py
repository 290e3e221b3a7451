"""The snapshots being stored in the background: one task per snapshot, off the VM's lock.

A store task never takes a VM's lock, so a holder of that lock (a restore waiting for the
snapshot, a delete calling the store off) may wait for it without deadlock.
"""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Awaitable, Callable
from dataclasses import dataclass

import structlog

log = structlog.get_logger("hatchvm.core")


Then = Callable[[], Awaitable[None]]  # what follows a store, under the VM's lock


@dataclass
class _Store:
    vm_id: str
    stop: threading.Event  # checked by the store's threads: called off
    ended: asyncio.Event  # the store itself has ended (its follow-up may still run)
    task: asyncio.Task[None] | None = None


class StoreTasks:
    def __init__(self) -> None:
        self._stores: dict[str, _Store] = {}
        self.closing = False  # stores called off at shutdown stay `storing`: resumed later

    def start(
        self,
        snapshot_id: str,
        vm_id: str,
        run: Callable[[threading.Event], Awaitable[Then | None]],
    ) -> None:
        """Run the store; then its follow-up, if it returns one (which may take the VM's
        lock: waiters of `wait` and `call_off` are released before it)."""
        store = _Store(vm_id, threading.Event(), asyncio.Event())

        async def body() -> None:
            then: Then | None = None
            try:
                then = await run(store.stop)
            except Exception as exc:  # run() settles the snapshot itself: this is a bug
                log.exception("snapshot store task failed", snapshot_id=snapshot_id, error=exc)
            finally:
                store.ended.set()
            if then is not None:
                try:
                    await then()
                except Exception as exc:
                    log.exception("after a snapshot store", snapshot_id=snapshot_id, error=exc)

        store.task = asyncio.create_task(body(), name=f"store-{snapshot_id}")
        self._stores[snapshot_id] = store
        store.task.add_done_callback(lambda _t: self._stores.pop(snapshot_id, None))

    async def wait(self, snapshot_id: str) -> None:
        """Until the snapshot's store has ended (at once if none runs)."""
        store = self._stores.get(snapshot_id)
        if store is not None:
            await store.ended.wait()

    async def call_off(self, snapshot_id: str) -> None:
        """Stop the snapshot's store and wait until it has ended."""
        store = self._stores.get(snapshot_id)
        if store is not None:
            store.stop.set()
            await store.ended.wait()

    async def call_off_vm(self, vm_id: str) -> None:
        for snapshot_id in [s for s, store in self._stores.items() if store.vm_id == vm_id]:
            await self.call_off(snapshot_id)

    async def close(self) -> None:
        """At shutdown: stores are called off (the next hatchd resumes them from the files),
        and what follows those that ended meanwhile is done."""
        self.closing = True
        stores = list(self._stores.values())
        for store in stores:
            store.stop.set()
        # A store's task ends after the store itself (ended) and its follow-up.
        await asyncio.gather(*(s.task for s in stores if s.task), return_exceptions=True)
