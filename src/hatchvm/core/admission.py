"""Host admission: a VM is created, started, restored or woken only if the host can hold it, so
the host neither swaps nor fills its disk. A refusal is a 503 that says what is short.

Memory, two ways: the VMs that run may each use their memory plus their VMM's overhead (the
cgroup limit), touched yet or not, so those amounts plus the new VM's must fit in the host's
memory less HATCH_HOST_MEM_RESERVE_MIB; and the kernel's MemAvailable, which sees everything
else on the host, must keep that reserve once the new VM's amount is taken from it.
Disk: the free space in HATCH_DATA_DIR must hold what the VM's disk and memory file may still
take (both are sparse) and keep HATCH_HOST_DISK_RESERVE_MIB free.

Callers hold `lock` from the check until the VM's transitional state (starting, restoring) is
persisted, so two boots at once each count the other.

Wake standbys (core/standbys.py) count too, a fixed amount each; when memory is short they are
ended first (those of VMs nobody is busy with), and the check is made again.
"""

from __future__ import annotations

import asyncio
import shutil
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

import psutil
from sqlalchemy import select
from sqlalchemy.ext.asyncio import AsyncSession, async_sessionmaker

from hatchvm.config import Settings
from hatchvm.core.states import State
from hatchvm.db.models import VM
from hatchvm.errors import BackendUnavailable

# States in which a VM has (or is about to have) a VMM process holding memory.
_HOLDING = [State.STARTING, State.RUNNING, State.STOPPING, State.SNAPSHOTTING, State.RESTORING]


@dataclass(frozen=True)
class HostState:
    mem_total_mib: int
    mem_available_mib: int  # the kernel's MemAvailable
    disk_free_mib: int  # in the data dir, for an unprivileged writer


def read_host(data_dir: Path) -> HostState:
    memory = psutil.virtual_memory()
    return HostState(
        mem_total_mib=memory.total >> 20,
        mem_available_mib=memory.available >> 20,
        disk_free_mib=shutil.disk_usage(data_dir).free >> 20,
    )


def space_needed_mib(files: dict[Path, int]) -> int:
    """MiB the files may still take: each one's full size less what it occupies already."""
    total = 0
    for path, size_mib in files.items():
        try:
            used = (path.stat().st_blocks * 512) >> 20
        except FileNotFoundError:
            used = 0
        total += max(size_mib - used, 0)
    return total


def check(
    settings: Settings, host: HostState, committed_mib: int, mem_mib: int, disk_mib: int
) -> None:
    """Refuse (503) a VM needing mem_mib of memory (overhead included) and disk_mib of new
    space, when VMs already hold committed_mib."""
    reserve = settings.host_mem_reserve_mib
    for_vms = host.mem_total_mib - reserve
    if committed_mib + mem_mib > for_vms:
        raise BackendUnavailable(
            f"not enough host memory: running VMs may use {committed_mib} MiB and this one "
            f"{mem_mib} MiB, VMs get {for_vms} MiB ({reserve} MiB kept for the host)"
        )
    if host.mem_available_mib - mem_mib < reserve:
        raise BackendUnavailable(
            f"not enough host memory: this VM may use {mem_mib} MiB, the host has "
            f"{host.mem_available_mib} MiB available and keeps {reserve} MiB"
        )
    disk_reserve = settings.host_disk_reserve_mib
    if host.disk_free_mib - disk_mib < disk_reserve:
        raise BackendUnavailable(
            f"not enough disk space in {settings.data_dir}: this VM needs {disk_mib} MiB, "
            f"{host.disk_free_mib} MiB are free and {disk_reserve} MiB kept free"
        )


class Spare(Protocol):
    """Memory held that may be given back on demand (wake standbys)."""

    def held_mib(self) -> int: ...

    async def reclaim(self) -> int:
        """Give back what can be now, without waiting for any lock; MiB freed."""
        ...


class HostAdmission:
    def __init__(
        self,
        settings: Settings,
        sessions: async_sessionmaker[AsyncSession],
        footprint_mib: Callable[[int], int],
    ) -> None:
        self._s = settings
        self._sessions = sessions
        self._footprint = footprint_mib  # the VMM's: memory + overhead of a VM of mem_mib
        self.lock = asyncio.Lock()
        self.spare: Spare | None = None

    async def check(
        self, session: AsyncSession, vm_id: str | None, mem_mib: int, disk_mib: int
    ) -> None:
        """Refuse (503) booting the VM vm_id (None: a new one) of mem_mib, which needs
        disk_mib of new space. The caller holds `lock`."""
        committed = await self._committed(session, vm_id)
        try:
            await self._check(committed, self._footprint(mem_mib), disk_mib)
        except BackendUnavailable:
            if self.spare is None or not await self.spare.reclaim():
                raise
            await self._check(committed, self._footprint(mem_mib), disk_mib)

    async def has_room(self, mem_mib: int) -> bool:
        """Whether mem_mib more fits now, nothing given back for it (a wake standby's)."""
        async with self.lock, self._sessions() as session:
            committed = await self._committed(session, None)
            try:
                await self._check(committed, mem_mib, 0)
            except BackendUnavailable:
                return False
        return True

    async def _committed(self, session: AsyncSession, vm_id: str | None) -> int:
        """What the VMs holding memory (vm_id's aside) may use, overheads included."""
        query = select(VM.mem_mib).where(VM.state.in_([s.value for s in _HOLDING]))
        if vm_id is not None:
            query = query.where(VM.id != vm_id)
        return sum(self._footprint(m) for m in (await session.scalars(query)).all())

    async def _check(self, committed_mib: int, mem_mib: int, disk_mib: int) -> None:
        held = self.spare.held_mib() if self.spare is not None else 0
        host = await asyncio.to_thread(read_host, self._s.data_dir)
        check(self._s, host, committed_mib + held, mem_mib, disk_mib)

    async def admit(self, vm_id: str, mem_mib: int, disk_mib: int) -> None:
        """check() for an existing VM, in a session of its own."""
        async with self._sessions() as session:
            await self.check(session, vm_id, mem_mib, disk_mib)
