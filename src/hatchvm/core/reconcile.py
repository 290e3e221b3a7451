"""Start-up reconciliation: make the database agree with what is really running.

VMM processes outlive the daemon. A VM whose process is still alive is reattached and stays
running; one whose process is gone becomes stopped (or error, if it never got a disk), with
the reason kept in state_reason and logged. VMs caught half-way through a snapshot or restore
are settled by the snapshot service; a snapshotted VM never keeps a process.
"""

from __future__ import annotations

import asyncio

import structlog

from hatchvm.core.network import GuestLink
from hatchvm.core.snapshots import SnapshotService
from hatchvm.core.states import State
from hatchvm.core.vms import DISK_NAME, FORK_PENDING, VMService
from hatchvm.db import repo
from hatchvm.db.models import VM
from hatchvm.vmm.base import RunningVM

log = structlog.get_logger("hatchvm.core")

_LIVE_STATES = {State.RUNNING, State.STARTING, State.STOPPING}


async def reconcile(service: VMService, snapshots: SnapshotService) -> None:
    async with service.sessions() as session:
        vms = await repo.list_vms(session)
    await _end_strays(service, {vm.id for vm in vms})
    running: list[GuestLink] = []
    alive: list[RunningVM] = []  # their cgroups are kept, all others' removed
    for vm in vms:
        vm_dir = service.vm_dir(vm.id)
        await asyncio.to_thread(snapshots.sweep_retired, vm.id)
        if vm.state in (State.SNAPSHOTTING, State.RESTORING):
            await snapshots.reconcile(vm)
            settled = await service.get(vm.user_id, vm.id)
            log.warning("interrupted snapshot or restore settled", vm_id=vm.id, state=settled.state)
            if settled.state == State.RUNNING:
                alive.append(_running(service, settled))
                if link := GuestLink.of(settled):
                    running.append(link)
            continue
        if vm.state == State.SNAPSHOTTED:
            if await service.vmm.alive(vm.id, vm_dir) is not None:
                await service.vmm.kill(vm.id, vm_dir)  # its state is saved; the process is stray
            await snapshots.reconcile(vm)
            continue
        if vm.state not in _LIVE_STATES:
            continue
        if vm.state == State.STARTING and (vm_dir / FORK_PENDING).exists():
            # A fork's child the daemon died making: it may still hold its parent's identity
            # and RNG state, so it never runs; the user sees why and deletes it.
            await service.teardown(vm)
            await service.update(
                vm.id,
                state=State.ERROR,
                state_reason="its fork was interrupted by a daemon restart",
                guest_ip=None,
                guest_mac=None,
                tap_name=None,
                ssh_port=None,
            )
            log.warning("interrupted fork discarded", vm_id=vm.id)
            continue
        pid = await service.vmm.alive(vm.id, vm_dir)
        if pid is not None:
            await service.adopt(vm)  # its console recorded and its life watched again
            # A boot the daemon did not live to let run is still paused: let it run now.
            if await service.vmm.resume_if_paused(vm.id, vm_dir):
                alive.append(_running(service, vm))
                if link := GuestLink.of(vm):
                    running.append(link)  # QEMU holds its TAP open; settle re-attaches it
                if vm.state != State.RUNNING:
                    await service.update(vm.id, state=State.RUNNING)
                log.info("vm reattached", vm_id=vm.id, pid=pid)
                continue
            await service.vmm.kill(vm.id, vm_dir)
        if not (vm_dir / DISK_NAME).exists():
            reason = (
                f"the vm has no disk (its creation or deletion was interrupted while {vm.state})"
            )
            await service.teardown(vm)
            await service.update(
                vm.id,
                state=State.ERROR,
                state_reason=reason,
                guest_ip=None,
                guest_mac=None,
                tap_name=None,
                ssh_port=None,
            )
        else:
            reason = f"vmm process gone at daemon start-up (was {vm.state})"
            await service.update(vm.id, state=State.STOPPED, state_reason=reason)
        log.warning("vm not running", vm_id=vm.id, reason=reason)
    await service.vmm.settle(alive)
    if service.net is not None:
        stale = await service.net.settle(running)
        if stale:
            log.info("removed stale taps", taps=stale)


async def _end_strays(service: VMService, known: set[str]) -> None:
    """VMM processes of this data directory that no row owns (a VM deleted while its boot
    went on, a daemon killed in between) are ended: nothing would ever stop them."""
    for vm_id, pid in (await service.vmm.processes(service.vms_dir)).items():
        if vm_id not in known:
            await service.vmm.kill(vm_id, service.vm_dir(vm_id))
            log.warning("stray vmm process ended: no vm owns it", vm_id=vm_id, pid=pid)


def _running(service: VMService, vm: VM) -> RunningVM:
    return RunningVM(vm.id, service.vm_dir(vm.id), vm.vcpu_count, vm.mem_mib)
