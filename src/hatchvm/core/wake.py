"""Waking VMs for the proxy and the SSH gateway: a snapshotted VM is restored from its latest
snapshot, a stopped one is cold-booted. Waiters on one VM share one wake task, which runs under
the VM's lock like every other operation and is not cancelled when a waiter goes away.

A wake that fails is not retried by the next request: the VM backs off (HATCH_WAKE_RETRY_BACKOFF
seconds, doubling), and every request until then is refused at once with the last reason, so
nothing (a snapshot download, a QEMU start) is redone per request. After
HATCH_WAKE_MAX_FAILURES failures in a row the VM goes to `error` with the reason. The count
lives in this process: a restarted daemon tries afresh.

Each wake is timed once (metrics: hatch_wake_duration_seconds, stage "wake"), labelled by how
the VM woke and by what asked first (proxy, ssh, api); every waiter learns how it woke, so the
proxy and the SSH gateway can time their own stages after it.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import TypeVar

import structlog

from hatchvm.core.snapshots import SnapshotService, latest_restorable
from hatchvm.core.states import State
from hatchvm.core.vms import VMService, reason_of
from hatchvm.db import repo
from hatchvm.db.models import VM
from hatchvm.errors import BackendUnavailable, Conflict, NotFound
from hatchvm.metrics import Metrics
from hatchvm.metrics.figures import How, Trigger

log = structlog.get_logger("hatchvm.core")

T = TypeVar("T")

MAX_BACKOFF = 600.0  # seconds: the longest wait between two attempts


class WakeFailed(BackendUnavailable):
    """The VM could not be woken now (503); the message says why and when it is tried again."""


@dataclass(frozen=True)
class Woken:
    vm: VM  # running
    how: How | None  # None: nothing was done, the VM already ran


@dataclass
class _Failures:
    count: int  # in a row
    reason: str  # of the last one
    retry_at: float  # the clock's time before which no wake is attempted


class WakeService:
    def __init__(
        self,
        vms: VMService,
        snapshots: SnapshotService,
        max_failures: int = 3,
        backoff: float = 5.0,
        clock: Callable[[], float] = time.monotonic,
        metrics: Metrics | None = None,
    ) -> None:
        self.vms = vms
        self.snapshots = snapshots
        self.max_failures = max_failures
        self.backoff = backoff
        self._clock = clock
        self.metrics = metrics or Metrics()
        self._tasks: dict[str, asyncio.Task[Woken]] = {}
        self._failures: dict[str, _Failures] = {}
        vms.delete_hooks.append(self._forget)

    async def ensure_running(self, vm: VM, trigger: Trigger = "api") -> VM:
        """The VM, running; raises the wake's error (HatchError) if it cannot be."""
        return (await self.wake_up(vm, trigger)).vm

    async def wake_up(self, vm: VM, trigger: Trigger) -> Woken:
        """ensure_running, also telling how the VM woke (for the caller's own timing)."""
        if vm.state == State.RUNNING:
            self._failures.pop(vm.id, None)  # woken some other way (the API): a fresh start
            return Woken(vm, None)
        if vm.state == State.ERROR:
            raise WakeFailed(f"vm {vm.id} is in error: {vm.state_reason or 'unknown'}")
        task = self._tasks.get(vm.id)
        if task is None:
            self._check_backoff(vm.id)
            wake = self._wake(vm.user_id, vm.id, trigger)
            task = asyncio.create_task(wake, name=f"wake-{vm.id}")
            self._tasks[vm.id] = task
            task.add_done_callback(lambda _t, vm_id=vm.id: self._tasks.pop(vm_id, None))
        # shield: a waiter that gives up (client gone, timeout) leaves the wake running.
        return await asyncio.shield(task)

    def _check_backoff(self, vm_id: str) -> None:
        failed = self._failures.get(vm_id)
        if failed is None:
            return
        left = failed.retry_at - self._clock()
        if left > 0:
            times = "once" if failed.count == 1 else f"{failed.count} times in a row"
            raise WakeFailed(
                f"waking vm {vm_id} failed {times} (last: {failed.reason}); "
                f"next attempt in {left:.0f}s"
            )

    async def _wake(self, user_id: str, vm_id: str, trigger: Trigger) -> Woken:
        began = time.monotonic()  # waiting for the lock is part of what the waiters see
        async with self.vms.locks.hold(vm_id):
            try:
                woken = await self._wake_locked(user_id, vm_id)
            except NotFound:
                raise  # deleted meanwhile: nothing to back off from
            except Exception as exc:
                self.metrics.wake_failed(trigger)
                raise await self._failed(vm_id, reason_of(exc)) from exc
        self._failures.pop(vm_id, None)
        if woken.how is not None:
            self.metrics.wake_stage("wake", woken.how, trigger, time.monotonic() - began)
        return woken

    async def _wake_locked(self, user_id: str, vm_id: str) -> Woken:
        vm = await self.vms.get(user_id, vm_id)
        if vm.state == State.RUNNING:
            return Woken(vm, None)
        if vm.state == State.SNAPSHOTTED:
            async with self.vms.sessions() as session:
                snaps = await repo.list_snapshots(session, vm_id)
            snap = latest_restorable(snaps)
            if snap is not None:
                log.info("waking vm from its latest snapshot", vm_id=vm_id, snapshot=snap.id)
                return Woken(await self.snapshots.restore_locked(vm, snap), "restore")
        if vm.state == State.STOPPED:
            log.info("waking stopped vm (cold boot)", vm_id=vm_id)
            return Woken(await self.vms.start_locked(vm), "cold_boot")
        raise Conflict(f"vm {vm_id} is {vm.state} and cannot be woken")

    async def _failed(self, vm_id: str, reason: str) -> WakeFailed:
        """Count a failure (the VM's lock is held): back off, or after too many, error."""
        previous = self._failures.get(vm_id)
        count = previous.count + 1 if previous else 1
        if count >= self.max_failures:
            self._failures.pop(vm_id, None)
            why = f"waking failed {count} times in a row, last: {reason}"
            log.error(
                "vm could not be woken, giving up", vm_id=vm_id, failures=count, reason=reason
            )
            await self.vms.update(vm_id, state=State.ERROR, state_reason=why)
            return WakeFailed(f"waking vm {vm_id} failed; vm is in error: {why}")
        delay = min(self.backoff * 2 ** (count - 1), MAX_BACKOFF)
        self._failures[vm_id] = _Failures(count, reason, self._clock() + delay)
        log.warning("vm wake failed", vm_id=vm_id, failures=count, retry_in_s=delay, reason=reason)
        return WakeFailed(f"waking vm {vm_id} failed: {reason}; next attempt in {delay:g}s")

    async def _forget(self, vm: VM) -> None:
        """Delete hook of VMService."""
        self._failures.pop(vm.id, None)


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
