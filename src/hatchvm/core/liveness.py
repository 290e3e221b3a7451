"""Deaths are seen. Every running VMM process has one watch (a pidfd and QEMU's event monitor,
through the driver's wait_exit: no polling). When a process ends and no operation of hatchd
ended it, the VM becomes `stopped` with a state_reason saying what happened and when, and its
last exit (how, and the console's last lines) is kept; a route with auto_wake then brings it
back like any stopped VM. A VM with restart "on-failure" is cold-booted again after a crash
(not after the guest powered itself off), with back-off.
"""

from __future__ import annotations

import asyncio
import dataclasses
import json
import time

import structlog

from hatchvm.core.console import Consoles, last_lines
from hatchvm.core.states import State
from hatchvm.core.vms import VMService
from hatchvm.db.models import VM
from hatchvm.errors import HatchError
from hatchvm.metrics import Metrics
from hatchvm.timefmt import rfc3339
from hatchvm.vmm.base import ExitInfo

log = structlog.get_logger("hatchvm.liveness")

FIRST_RESTART_DELAY = 1.0
MAX_RESTART_DELAY = 60.0
STABLE_AFTER = 120.0  # seconds up after which a crash counts as the first one again
CONSOLE_TAIL = 16 << 10  # how far back a guest's kernel panic is looked for
PANIC = b"Kernel panic - not syncing"


_REPLACED = object()  # what _record says when another run of the VM took the dead one's place


class Liveness:
    def __init__(self, vms: VMService, metrics: Metrics | None = None) -> None:
        self.vms = vms
        self.metrics = metrics or Metrics()
        self._watches: dict[str, asyncio.Task[None]] = {}
        self._restarts: dict[str, asyncio.Task[None]] = {}
        self._crashes: dict[str, tuple[int, float]] = {}  # vm id -> (in a row, last boot)
        vms.run_hooks.append(self.watch)
        vms.delete_hooks.append(self._forget)

    def watch(self, vm: VM) -> None:
        """Watch the VM's VMM process that runs now (called after each start and reattach;
        a watch of the same process that goes on already is enough)."""
        current = self._watches.get(vm.id)
        if current is not None and not current.done():
            return
        self._crashes.setdefault(vm.id, (0, time.monotonic()))
        self._crashes[vm.id] = (self._crashes[vm.id][0], time.monotonic())
        task = asyncio.create_task(self._watch(vm.id), name=f"liveness-{vm.id}")
        self._watches[vm.id] = task
        task.add_done_callback(lambda t, vm_id=vm.id: self._done(vm_id, t))

    def _done(self, vm_id: str, task: asyncio.Task[None]) -> None:
        if self._watches.get(vm_id) is task:
            del self._watches[vm_id]
        if not task.cancelled() and (exc := task.exception()) is not None:
            log.error("watching a vm failed", vm_id=vm_id, error=repr(exc))

    async def close(self) -> None:
        for task in [*self._watches.values(), *self._restarts.values()]:
            task.cancel()

    async def _watch(self, vm_id: str) -> None:
        while True:
            info = await self.vms.vmm.wait_exit(vm_id, self.vms.vm_dir(vm_id))
            vm = await self._record(vm_id, info)
            if vm is not _REPLACED:
                break
            # Another run took its place while this watch waited for the VM's lock (a create
            # that fell back from its template to a boot): its watch() found this one going on.
        if isinstance(vm, VM) and vm.restart == "on-failure" and not info.clean:
            self._schedule_restart(vm)

    async def _record(self, vm_id: str, info: ExitInfo) -> VM | object | None:
        """Under the VM's lock: if nothing of hatchd's ended it, record the death; _REPLACED
        when another run of the VM runs now."""
        async with self.vms.locks.hold(vm_id):
            vm = await self.vms.load(vm_id)
            if vm is None or vm.state != State.RUNNING:
                return None  # hatchd ended it (stop, snapshot, delete): not a death
            if await self.vms.vmm.alive(vm_id, self.vms.vm_dir(vm_id)) is not None:
                return _REPLACED  # another run of the VM already took its place
            console = Consoles.tail(self.vms.vm_dir(vm_id), CONSOLE_TAIL)
            if info.reason == "guest-reset" and PANIC in console:
                info = dataclasses.replace(info, reason="guest-panic")  # -no-reboot hid it
            reason = f"{info.describe()} at {rfc3339(info.at)}"
            last_exit = {
                "at": rfc3339(info.at),
                "reason": info.reason,
                "description": info.describe(),
                "exit_code": info.exit_code,
                "signal": info.signal,
                "console": last_lines(self.vms.vm_dir(vm_id)),
            }
            log.warning("vm died", vm_id=vm_id, reason=reason)
            self.metrics.vm_died(info.reason)
            return await self.vms.record_death(vm, reason, json.dumps(last_exit))

    def _schedule_restart(self, vm: VM) -> None:
        count, booted = self._crashes.get(vm.id, (0, time.monotonic()))
        count = 1 if time.monotonic() - booted > STABLE_AFTER else count + 1
        self._crashes[vm.id] = (count, booted)
        delay = min(FIRST_RESTART_DELAY * 2 ** (count - 1), MAX_RESTART_DELAY)
        task = asyncio.create_task(self._restart(vm, delay, count), name=f"restart-{vm.id}")
        self._restarts[vm.id] = task
        task.add_done_callback(lambda t, vm_id=vm.id: self._restarts.pop(vm_id, None))

    async def _restart(self, vm: VM, delay: float, count: int) -> None:
        log.info("vm will restart", vm_id=vm.id, delay=delay, crashes_in_a_row=count)
        await asyncio.sleep(delay)
        async with self.vms.locks.hold(vm.id):
            current = await self.vms.load(vm.id)
            # Only the death recorded above: a VM started, deleted or changed since is left.
            if current is None or current.state != State.STOPPED:
                return
            if current.state_reason != vm.state_reason:
                return
            try:
                await self.vms.start_locked(current)
            except HatchError as exc:
                log.error("vm restart failed", vm_id=vm.id, reason=exc.message)
                return
        log.info("vm restarted after a crash", vm_id=vm.id, crashes_in_a_row=count)

    async def _forget(self, vm: VM) -> None:
        self._crashes.pop(vm.id, None)
        if (task := self._restarts.pop(vm.id, None)) is not None:
            task.cancel()
