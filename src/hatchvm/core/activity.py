"""Who is using which VM, for the idle reaper: the moment of the last use (proxy request, SSH
connection, API operation; kept in the database, written at most every few seconds per VM) and
the connections open right now (a long SSH session or WebSocket is use, even when quiet)."""

from __future__ import annotations

import asyncio
import time
from collections import Counter
from collections.abc import Iterator
from contextlib import contextmanager

from hatchvm.core.vms import VMService

WRITE_EVERY = 5.0  # seconds between two activity writes for one VM


class Activity:
    def __init__(self, vms: VMService) -> None:
        self.vms = vms
        self._written: dict[str, float] = {}
        self._open: Counter[str] = Counter()
        self._pending: set[asyncio.Task[None]] = set()

    def touch(self, vm_id: str, now: float | None = None) -> None:
        now = time.monotonic() if now is None else now
        if now - self._written.get(vm_id, float("-inf")) < WRITE_EVERY:
            return
        self._written[vm_id] = now
        task = asyncio.create_task(self.vms.touch_activity(vm_id))
        self._pending.add(task)
        task.add_done_callback(self._pending.discard)

    def open(self, vm_id: str) -> float:
        """A connection (or request) to vm_id starts; pass the result to close()."""
        now = time.monotonic()  # once: the proxy calls this for every request
        self.touch(vm_id, now)
        self._open[vm_id] += 1
        return now

    def close(self, vm_id: str, opened: float) -> None:
        self._open[vm_id] -= 1
        if self._open[vm_id] <= 0:
            del self._open[vm_id]
        now = time.monotonic()
        if now - opened >= WRITE_EVERY:
            self._written.pop(vm_id, None)  # a long session: its end is news
        self.touch(vm_id, now)

    @contextmanager
    def connection(self, vm_id: str) -> Iterator[None]:
        """While open, the VM is in use; opening and closing both count as activity."""
        opened = self.open(vm_id)
        try:
            yield
        finally:
            self.close(vm_id, opened)

    def busy(self, vm_id: str) -> bool:
        return self._open.get(vm_id, 0) > 0
