"""The idle reaper: every HATCH_IDLE_CHECK_INTERVAL, running VMs that have an auto_wake route
and no activity for HATCH_IDLE_TIMEOUT are snapshotted (an automatic snapshot: at the quota,
the oldest automatic one makes room). The next request or SSH connection wakes them."""

from __future__ import annotations

import asyncio
import contextlib
from datetime import UTC, datetime, timedelta

import structlog

from hatchvm.config import Settings
from hatchvm.core.activity import Activity
from hatchvm.core.routes import RouteService
from hatchvm.core.snapshots import SnapshotService
from hatchvm.core.states import State
from hatchvm.db import repo
from hatchvm.errors import HatchError

log = structlog.get_logger("hatchvm.reaper")


class IdleReaper:
    def __init__(
        self,
        settings: Settings,
        snapshots: SnapshotService,
        routes: RouteService,
        activity: Activity,
    ) -> None:
        self._s = settings
        self.snapshots = snapshots
        self.routes = routes
        self.activity = activity
        self._task: asyncio.Task[None] | None = None

    def start(self) -> None:
        self._task = asyncio.create_task(self._run(), name="idle-reaper")

    async def close(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task

    async def _run(self) -> None:
        while True:
            await asyncio.sleep(self._s.idle_check_interval)
            try:
                await self.sweep()
            except Exception:  # one bad sweep must not end the reaper
                log.exception("idle sweep failed")

    async def sweep(self) -> list[str]:
        """Snapshot every idle VM now; return their ids."""
        vms = self.snapshots.vms
        cutoff = datetime.now(UTC) - timedelta(seconds=self._s.idle_timeout)
        async with vms.sessions() as session:
            candidates = [
                vm
                for vm in await repo.list_vms(session)
                if vm.state == State.RUNNING and vm.last_activity_at < cutoff
            ]
        frozen = []
        for vm in candidates:
            if self.activity.busy(vm.id) or not self.routes.wakes(vm.id):
                continue
            try:
                snap = await self.snapshots.snapshot_if_idle(vm.user_id, vm.id, cutoff)
            except HatchError as exc:
                log.warning("idle snapshot failed", vm_id=vm.id, reason=exc.message)
                continue
            if snap is not None:
                frozen.append(vm.id)
                log.info("idle vm snapshotted", vm_id=vm.id, snapshot_id=snap.id)
        return frozen
