"""Waking VMs for the proxy (and later the SSH gateway): a snapshotted VM is restored from its
latest snapshot, a stopped one is cold-booted. Waiters on one VM share one wake task, which runs
under the VM's lock like every other operation and is not cancelled when a waiter goes away."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable
from typing import TypeVar

import structlog

from hatchvm.core.snapshots import SnapshotService
from hatchvm.core.states import State
from hatchvm.core.vms import VMService
from hatchvm.db import repo
from hatchvm.db.models import VM
from hatchvm.errors import Conflict

log = structlog.get_logger("hatchvm.core")

T = TypeVar("T")


class WakeService:
    def __init__(self, vms: VMService, snapshots: SnapshotService) -> None:
        self.vms = vms
        self.snapshots = snapshots
        self._tasks: dict[str, asyncio.Task[VM]] = {}

    async def ensure_running(self, vm: VM) -> VM:
        """The VM, running; raises the wake's error (HatchError) if it cannot be."""
        if vm.state == State.RUNNING:
            return vm
        task = self._tasks.get(vm.id)
        if task is None:
            task = asyncio.create_task(self._wake(vm.user_id, vm.id), name=f"wake-{vm.id}")
            self._tasks[vm.id] = task
            task.add_done_callback(lambda _t, vm_id=vm.id: self._tasks.pop(vm_id, None))
        # shield: a waiter that gives up (client gone, timeout) leaves the wake running.
        return await asyncio.shield(task)

    async def _wake(self, user_id: str, vm_id: str) -> VM:
        async with self.vms.locks.hold(vm_id):
            vm = await self.vms.get(user_id, vm_id)
            if vm.state == State.RUNNING:
                return vm
            if vm.state == State.SNAPSHOTTED:
                async with self.vms.sessions() as session:
                    snaps = await repo.list_snapshots(session, vm_id)
                if snaps:
                    log.info(
                        "waking vm from its latest snapshot", vm_id=vm_id, snapshot=snaps[0].id
                    )
                    return await self.snapshots.restore_locked(vm, snaps[0])
            if vm.state == State.STOPPED:
                log.info("waking stopped vm (cold boot)", vm_id=vm_id)
                return await self.vms.start_locked(vm)
            raise Conflict(f"vm {vm_id} is {vm.state} and cannot be woken")


async def first_connection(connect: Callable[[], Awaitable[T]], deadline: float) -> T | None:
    """connect() retried until it succeeds or time.monotonic() passes deadline (None then).
    After a wake the guest's service needs a moment: poll with a short back-off, never a fixed
    sleep, and use the connection that got through (a throwaway probe would cost the guest an
    accept and a fork right when it is busiest). An attempt whose SYN goes unanswered is cut
    short rather than left to TCP's one-second retransmission."""
    delay, attempt = 0.002, 0.25
    while True:
        left = deadline - time.monotonic()
        try:
            return await asyncio.wait_for(connect(), max(min(attempt, left), 0.01))
        except TimeoutError:
            attempt = min(attempt * 2, 2.0)  # a slow guest gets longer each time
        except OSError:
            pass  # refused: the service is not listening yet
        if time.monotonic() + delay > deadline:
            return None
        await asyncio.sleep(delay)
        delay = min(delay * 1.5, 0.02)  # a connect attempt on the bridge is cheap; waiting is not
