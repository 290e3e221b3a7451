"""core records what happens (tests/unit/core_on_fake.py: the real services on the fake VMM):
snapshots, restores hot and from the store, wakes by how and by whom, failed wakes, deaths."""

from __future__ import annotations

from collections.abc import AsyncIterator
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
from prometheus_client import generate_latest

from hatchvm.core.states import State
from hatchvm.db.models import STORED, Snapshot
from hatchvm.errors import HatchError
from hatchvm.metrics import Metrics
from hatchvm.snapshots.formats import PAGE
from hatchvm.vmm.base import VMMRequestFailed
from tests.support.wait import until
from tests.unit.core_on_fake import USER, Core, make_core
from tests.unit.test_metrics import value


@pytest.fixture
async def metrics() -> Metrics:
    return Metrics()


@pytest.fixture
async def core(tmp_path: Path, metrics: Metrics) -> AsyncIterator[Core]:
    async for made in make_core(tmp_path, metrics=metrics):
        yield made


def text(metrics: Metrics) -> str:
    return generate_latest(metrics.registry).decode()


async def test_snapshots_restores_and_wakes_are_measured(core: Core, metrics: Metrics) -> None:
    vm = await core.create()
    first = await core.snapshots.snapshot(USER, vm.id)
    # The call returns once captured, the store is measured in the background when it ends.
    now = text(metrics)
    assert value(now, "hatch_snapshot_capture_duration_seconds_count", automatic="false") == 1
    first = await stored(core, first.id)
    now = text(metrics)
    assert value(now, "hatch_snapshot_store_duration_seconds_count", automatic="false") == 1
    stored_bytes = value(now, "hatch_snapshot_stored_bytes_total", automatic="false")
    assert stored_bytes == first.size_bytes > 0
    shared_before = value(now, "hatch_snapshot_bytes_deduplicated_total")

    woken = await core.wake.ensure_running(await core.state(vm.id))  # the API's callers
    assert woken.state == State.RUNNING
    now = text(metrics)
    api = {"stage": "wake", "how": "restore", "trigger": "api"}
    assert value(now, "hatch_wake_duration_seconds_count", **api) == 1
    assert value(now, "hatch_restore_duration_seconds_count", source="hot") == 1

    second = await core.snapshots.snapshot_if_idle(
        USER, vm.id, datetime.now(UTC) + timedelta(days=1)
    )
    assert second is not None
    await stored(core, second.id)
    # Nothing wrote to the disk in between: the second snapshot stores none of its pages again.
    disk = nonzero_page_bytes(core.vms.vm_dir(vm.id) / "disk.ext4")
    shared = value(text(metrics), "hatch_snapshot_bytes_deduplicated_total") - shared_before
    assert shared >= disk > 0
    await core.snapshots.restore(USER, vm.id, first.id)  # not the files it has: from the store
    now = text(metrics)
    assert value(now, "hatch_snapshot_capture_duration_seconds_count", automatic="true") == 1
    assert value(now, "hatch_restore_duration_seconds_count", source="store") == 1
    assert value(now, "hatch_restore_duration_seconds_count", source="hot") == 1


async def test_a_death_and_the_cold_boot_after_it(core: Core, metrics: Metrics) -> None:
    vm = await core.create()
    core.host.crash(vm.id)  # SIGKILL: the VMM said nothing
    await until(lambda: _stopped(core, vm.id), 5, "the death to be recorded")
    assert value(text(metrics), "hatch_vm_deaths_total", reason="unknown") == 1

    woken = await core.wake.wake_up(await core.state(vm.id), "ssh")
    assert woken.how == "cold_boot"
    cold = {"stage": "wake", "how": "cold_boot", "trigger": "ssh"}
    assert value(text(metrics), "hatch_wake_duration_seconds_count", **cold) == 1
    again = await core.wake.wake_up(woken.vm, "ssh")
    assert again.how is None  # it ran: nothing done, nothing measured
    assert value(text(metrics), "hatch_wake_duration_seconds_count", **cold) == 1


async def test_failed_wakes_and_restores_are_counted(core: Core, metrics: Metrics) -> None:
    vm = await core.create()
    await core.snapshots.snapshot(USER, vm.id)
    core.host.fail("restore", VMMRequestFailed("refused"))
    with pytest.raises(HatchError):
        await core.wake.wake_up(await core.state(vm.id), "proxy")
    now = text(metrics)
    assert value(now, "hatch_wake_failures_total", trigger="proxy") == 1
    assert value(now, "hatch_snapshot_failures_total", step="restore") == 1
    restore = {"stage": "wake", "how": "restore", "trigger": "proxy"}
    assert value(now, "hatch_wake_duration_seconds_count", **restore) == 0


async def stored(core: Core, snapshot_id: str) -> Snapshot:
    await core.snapshots.storing.wait(snapshot_id)
    snap = await core.snapshots.get(USER, snapshot_id)
    assert snap.status == STORED, snap.status_reason
    return snap


def nonzero_page_bytes(path: Path) -> int:
    data = path.read_bytes()
    pages = (data[i : i + PAGE] for i in range(0, len(data), PAGE))
    return sum(len(p) for p in pages if p.count(0) != len(p))


async def _stopped(core: Core, vm_id: str) -> bool:
    return (await core.state(vm_id)).state == State.STOPPED
