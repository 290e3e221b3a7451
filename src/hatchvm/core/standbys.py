"""Wake standbys: a sleeping VM's VMM started ahead, waiting for its state.

Most of what a hot wake adds to the guest's own resume is starting its VMM (QEMU: 40-70 ms
here, of a ~200 ms wake). A VM that sleeps on its own files, its latest snapshot stored (so no
store or fork reads those files through another link), has its VMM started again at once,
waiting for its device state (vmm.start_incoming), with its TAP attached but down: a wake then
only loads the state (about 0.1 MB) and lets the guest run. The driver uses that VMM only if it
was started for the same spec and still maps the files at the VM's paths (vmm.restore).

Each standby costs its VMM's own memory (about 50 MiB measured under TCG: no guest RAM is
touched), so at most HATCH_WAKE_STANDBYS VMs keep one, the most recently put to sleep. Host
admission counts each at STANDBY_MIB and, when it is short of memory, ends the standbys of VMs
nobody is busy with before it refuses anything.

A standby is held under its VM's lock: offered once a snapshot is stored, taken by the restore
that uses it (or gives it up), ended when the VM is deleted, evicted by a newer one, when a
fork's children link its memory file (the VM gets a copy of its own and a new standby on it:
SnapshotService.own_copy_later), or at shutdown. A daemon that dies leaves its standbys to
start-up, which ends them (a snapshotted VM keeps no process) and offers new ones.
"""

from __future__ import annotations

import asyncio
from collections import OrderedDict

import structlog

from hatchvm.core.vms import VMService, reason_of
from hatchvm.db.models import VM
from hatchvm.metrics import Metrics
from hatchvm.vmm.overhead import STANDBY_MIB

log = structlog.get_logger("hatchvm.core")


class Standbys:
    def __init__(self, vms: VMService, limit: int, metrics: Metrics | None = None) -> None:
        self.vms = vms
        self.limit = limit
        self.metrics = metrics or Metrics()
        self._held: OrderedDict[str, None] = OrderedDict()  # VM ids, the oldest first
        self._evictions: set[asyncio.Task[None]] = set()
        self._closed = False
        vms.admission.spare = self
        vms.delete_hooks.append(self._deleted)

    def held(self) -> list[str]:
        """The VMs that have a standby, the oldest first."""
        return list(self._held)

    def held_mib(self) -> int:
        """Host memory admission counts for the standbys."""
        return len(self._held) * STANDBY_MIB

    async def offer(self, vm: VM) -> None:
        """Start vm's standby: it sleeps on its own files, its latest snapshot stored, and the
        caller holds its lock. Nothing happens when standbys are off, the host has no room for
        one, or it has one; a standby that cannot start is only logged (its wake starts the
        VMM as usual)."""
        if self.limit == 0 or self._closed or vm.id in self._held:
            return
        if not await self.vms.admission.has_room(STANDBY_MIB):
            log.info("no wake standby: host memory is short", vm_id=vm.id)
            return
        try:
            image = await self.vms.image_files(vm)
            await self.vms.attach_network(vm, plugged=False)  # down: nothing passes it
            started = await self.vms.vmm.start_incoming(self.vms.boot_spec(vm, image))
        except Exception as exc:
            log.warning("no wake standby", vm_id=vm.id, reason=reason_of(exc))
            await self._end(vm.id, vm)
            return
        if not started:  # a driver that starts nothing ahead (Firecracker)
            await self.vms.detach_network(vm)
            return
        if self._closed:  # the daemon shut down meanwhile: none is left behind
            await self._end(vm.id, vm)
            return
        self._held[vm.id] = None
        self._count()
        log.info("wake standby ready", vm_id=vm.id)
        for old in list(self._held)[: max(len(self._held) - self.limit, 0)]:
            task = asyncio.create_task(self._evict(old), name=f"evict-standby-{old}")
            self._evictions.add(task)
            task.add_done_callback(self._evictions.discard)

    async def take(self, vm: VM, usable: bool) -> None:
        """A restore of vm begins (the caller holds its lock): its standby is the restore's to
        use (the driver checks that it fits), or, when it cannot be (another snapshot's files
        are laid out), ended now."""
        if vm.id not in self._held:
            return
        del self._held[vm.id]
        self._count()
        if not usable:
            await self.vms.vmm.discard_incoming(vm.id, self.vms.vm_dir(vm.id))

    async def end(self, vm: VM) -> None:
        """End vm's standby, if it has one (the caller holds its lock): its files are about
        to be replaced by copies of themselves, which that VMM does not map."""
        if vm.id in self._held:
            await self._end(vm.id, vm)

    async def reclaim(self) -> int:
        """End the standbys of VMs nobody is busy with, for host admission; MiB freed. Never
        waits for a VM's lock: the caller may hold another's and the admission lock."""
        freed = 0
        for vm_id in list(self._held):
            async with self.vms.locks.held_if_free(vm_id) as held:
                if held and vm_id in self._held:
                    await self._end(vm_id, await self.vms.load(vm_id))
                    freed += STANDBY_MIB
        if freed:
            log.info("wake standbys ended for host memory", freed_mib=freed)
        return freed

    async def close(self) -> None:
        """At shutdown: every standby ends (start-up offers new ones), and one being
        offered meanwhile ends as soon as it has started."""
        self._closed = True
        for task in list(self._evictions):
            task.cancel()
        await asyncio.gather(*self._evictions, return_exceptions=True)
        while self._held:
            vm_id = next(iter(self._held))
            async with self.vms.locks.hold(vm_id):
                if vm_id in self._held:
                    await self._end(vm_id, await self.vms.load(vm_id))

    async def _evict(self, vm_id: str) -> None:
        """A newer standby took the place of vm_id's (if a wake has not taken it meanwhile)."""
        async with self.vms.locks.hold(vm_id):
            if vm_id in self._held:
                await self._end(vm_id, await self.vms.load(vm_id))
                log.info("wake standby evicted by newer ones", vm_id=vm_id, limit=self.limit)

    async def _end(self, vm_id: str, vm: VM | None) -> None:
        """Under the VM's lock: its standby VMM ended and its TAP gone."""
        self._held.pop(vm_id, None)
        self._count()
        try:
            await self.vms.vmm.discard_incoming(vm_id, self.vms.vm_dir(vm_id))
            if vm is not None:
                await self.vms.detach_network(vm)
        except Exception as exc:  # start-up sweeps what is left
            log.warning("wake standby not ended cleanly", vm_id=vm_id, reason=reason_of(exc))

    async def _deleted(self, vm: VM) -> None:
        """Delete hook: the VM's teardown ended its VMM and detached it already."""
        self._held.pop(vm.id, None)
        self._count()

    def _count(self) -> None:
        self.metrics.standbys(len(self._held))
