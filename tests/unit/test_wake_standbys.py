"""Wake standbys (core/standbys.py) on the fake VMM, whose start_incoming/restore keep QEMU's
rules: a VM put to sleep on its own files, once its snapshot is stored, gets its VMM started
ahead; a wake takes it; it is never used for other files; the newest HATCH_WAKE_STANDBYS are
kept; a delete, a restore of another snapshot, host memory running short and a restart each
end it; a VM whose memory file a fork's children link gets a copy of its own in the background,
and a standby on that copy."""

from __future__ import annotations

import asyncio
import os
import shutil
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from hatchvm.core import admission
from hatchvm.core.admission import HostState
from hatchvm.core.reconcile import reconcile
from hatchvm.core.snapshots import SnapshotService, latest_restorable
from hatchvm.core.states import State
from hatchvm.core.vms import MEM_NAME
from hatchvm.db.models import VM, Snapshot
from hatchvm.errors import BackendUnavailable
from hatchvm.snapshots.local import LocalStore
from hatchvm.vmm.fake import FakeProcess, FakeVMM
from tests.support.wait import until
from tests.unit.core_on_fake import USER, Core, make_core

PAGE = 4096


@pytest.fixture
async def core(tmp_path: Path) -> AsyncIterator[Core]:
    async for made in make_core(tmp_path, wake_standbys=2):
        yield made


async def _asleep(core: Core, vm: VM | None = None) -> VM:
    """A VM snapshotted, its snapshot stored and what follows the store done; as it is now."""
    vm = vm or await core.create()
    snap = await core.snapshots.snapshot(USER, vm.id)
    await _stored(core, vm.id, snap.id)
    return await core.state(vm.id)


async def _stored(core: Core, vm_id: str, snap_id: str) -> None:
    await core.snapshots.storing.wait(snap_id)
    await until(lambda: not core.vms.locks.busy(vm_id), 5, "the store's follow-up")


def _standby(core: Core, vm_id: str) -> FakeProcess | None:
    proc = core.host.running(vm_id)
    return proc if proc is not None and proc.state == "incoming" else None


def _ahead(core: Core, vm_id: str) -> bool:
    return ("restore-ahead", vm_id) in core.host.calls


async def test_a_sleeping_vm_waits_in_its_standby_and_the_wake_takes_it(core: Core) -> None:
    vm = await core.create()
    snap = await core.snapshots.snapshot(USER, vm.id)
    assert core.host.running(vm.id) is None  # captured: its VMM ended, nothing ahead yet

    await _stored(core, vm.id, snap.id)
    vm = await core.state(vm.id)
    standby = _standby(core, vm.id)
    assert standby is not None and core.snapshots.standbys.held() == [vm.id]
    assert (await core.state(vm.id)).state == State.SNAPSHOTTED

    woken = await core.wake.ensure_running(vm)
    assert woken.state == State.RUNNING
    assert _ahead(core, vm.id)
    proc = core.host.running(vm.id)
    assert proc is not None and proc.pid == standby.pid and proc.state == "running"
    assert core.snapshots.standbys.held() == []


async def test_no_standby_when_they_are_off(tmp_path: Path) -> None:
    async for core in make_core(tmp_path, wake_standbys=0):
        vm = await _asleep(core)
        assert core.host.running(vm.id) is None
        await core.wake.ensure_running(vm)
        assert (await core.state(vm.id)).state == State.RUNNING
        assert not _ahead(core, vm.id)


async def test_the_most_recently_put_to_sleep_keep_theirs(core: Core) -> None:
    first, second, third = [await core.create() for _ in range(3)]
    first = await _asleep(core, first)
    await _asleep(core, second)
    assert _standby(core, first.id) is not None

    await _asleep(core, third)  # the limit is 2: the oldest one's ends
    await until(lambda: _standby(core, first.id) is None, 5, "the oldest standby to end")
    assert core.snapshots.standbys.held() == [second.id, third.id]
    assert _standby(core, second.id) is not None and _standby(core, third.id) is not None

    await core.wake.ensure_running(first)  # still wakes, its VMM started as usual
    assert (await core.state(first.id)).state == State.RUNNING
    assert not _ahead(core, first.id)


async def test_a_file_replaced_since_is_never_used_by_the_standby(core: Core) -> None:
    """What frozen.unshare does when a store or a fork still links the memory file: the path
    names a copy; the standby maps the old file and must not resume on it."""
    vm = await _asleep(core)
    assert _standby(core, vm.id) is not None
    mem = core.vms.vm_dir(vm.id) / MEM_NAME
    shutil.copyfile(mem, mem.with_name("copy"))
    os.replace(mem.with_name("copy"), mem)

    await core.wake.ensure_running(vm)
    assert (await core.state(vm.id)).state == State.RUNNING
    assert not _ahead(core, vm.id)


async def test_restoring_another_snapshot_ends_the_standby_first(core: Core) -> None:
    vm = await core.create()
    mem = core.vms.vm_dir(vm.id) / MEM_NAME
    with mem.open("r+b") as f:
        f.write(b"A" * PAGE)
    first = await core.snapshots.snapshot(USER, vm.id)
    await core.snapshots.storing.wait(first.id)
    await core.snapshots.restore(USER, vm.id)
    with mem.open("r+b") as f:
        f.write(b"B" * PAGE)
    await _asleep(core, vm)
    standby = _standby(core, vm.id)
    assert standby is not None

    restored = await core.snapshots.restore(USER, vm.id, first.id)
    assert restored.state == State.RUNNING
    assert standby.exit is not None  # ended, not used: it mapped the files laid out anew
    proc = core.host.running(vm.id)
    assert proc is not None and proc.pid != standby.pid
    assert mem.read_bytes()[:PAGE] == b"A" * PAGE


async def test_a_deleted_vm_leaves_no_standby(core: Core) -> None:
    vm = await _asleep(core)
    standby = _standby(core, vm.id)
    assert standby is not None
    await core.vms.delete(USER, vm.id)
    assert standby.exit is not None and core.host.running(vm.id) is None
    assert core.snapshots.standbys.held() == []


def _host(monkeypatch: pytest.MonkeyPatch, total_mib: int) -> None:
    state = HostState(mem_total_mib=total_mib, mem_available_mib=100_000, disk_free_mib=100_000)
    monkeypatch.setattr(admission, "read_host", lambda _data_dir: state)


async def test_standbys_give_their_memory_back_to_a_vm_that_needs_it(
    core: Core, monkeypatch: pytest.MonkeyPatch
) -> None:
    # The fake's VM of 128 MiB needs 160 with its overhead; a standby is counted 64.
    _host(monkeypatch, 160 + 64 - 1)
    sleeper = await _asleep(core)
    standby = _standby(core, sleeper.id)
    assert standby is not None

    created = await core.create()  # fits only once the standby is ended
    assert created.state == State.RUNNING
    assert standby.exit is not None and core.snapshots.standbys.held() == []

    await core.vms.stop(USER, created.id)  # the positive control: a check that does refuse
    _host(monkeypatch, 159)
    with pytest.raises(BackendUnavailable, match="not enough host memory"):
        await core.create()


async def test_no_standby_without_room_for_it(core: Core, monkeypatch: pytest.MonkeyPatch) -> None:
    vm = await core.create()
    _host(monkeypatch, 63)
    vm = await _asleep(core, vm)
    assert core.host.running(vm.id) is None and core.snapshots.standbys.held() == []
    _host(monkeypatch, 160 + 64)  # the positive control: room for it beside the VM's wake
    vm = await _asleep(core, await core.wake.ensure_running(vm))
    assert _standby(core, vm.id) is not None


async def test_a_restarted_daemon_ends_the_old_standbys_and_offers_new_ones(core: Core) -> None:
    vm = await _asleep(core)
    old = _standby(core, vm.id)
    assert old is not None

    # A new daemon: a new driver object on the same host, new services, reconciliation.
    core.vms.vmm = FakeVMM(core.host, core.vms.vmm.features)  # type: ignore[attr-defined]
    snapshots = SnapshotService(core.settings, core.vms, LocalStore(core.settings.snapshots_dir))
    await reconcile(core.vms, snapshots)
    assert old.exit is not None and core.host.running(vm.id) is None
    await snapshots.offer_standbys()
    new = _standby(core, vm.id)
    assert new is not None and new.pid != old.pid
    assert snapshots.standbys.held() == [vm.id]

    await snapshots.restore(USER, vm.id)
    assert _ahead(core, vm.id) and (await core.state(vm.id)).state == State.RUNNING


async def test_a_driver_that_starts_nothing_ahead_keeps_no_standby(
    core: Core, monkeypatch: pytest.MonkeyPatch
) -> None:
    async def starts_nothing(spec: object) -> bool:
        return False  # as Firecracker's

    monkeypatch.setattr(core.vms.vmm, "start_incoming", starts_nothing)
    vm = await _asleep(core)
    assert core.snapshots.standbys.held() == [] and core.host.running(vm.id) is None
    await core.wake.ensure_running(vm)
    assert (await core.state(vm.id)).state == State.RUNNING


async def test_shutdown_leaves_no_standby_even_one_being_offered(core: Core) -> None:
    asleep = await _asleep(core)
    assert _standby(core, asleep.id) is not None
    vm = await core.create()
    await core.snapshots.snapshot(USER, vm.id)  # its store and its standby still to come

    await core.snapshots.close()
    assert core.host.running(asleep.id) is None and core.host.running(vm.id) is None
    assert core.snapshots.standbys.held() == []
    await core.snapshots.standbys.offer(await core.state(asleep.id))  # after shutdown: none
    assert core.host.running(asleep.id) is None


def _link_like_a_fork(core: Core, vm_id: str) -> Path:
    """What a fork of the sleeping VM leaves: its children link its memory file."""
    mem = core.vms.vm_dir(vm_id) / MEM_NAME
    child = core.settings.data_dir / f"child-of-{vm_id}"
    os.link(mem, child)
    return child


async def _latest(core: Core, vm_id: str) -> Snapshot:
    snap = latest_restorable(await core.snapshots.list(USER, vm_id))
    assert snap is not None
    return snap


async def _copied(core: Core) -> None:
    await asyncio.gather(*core.snapshots._copying)


async def test_a_forked_sleeping_vm_gets_its_own_copy_and_a_standby_on_it(core: Core) -> None:
    vm = await _asleep(core)
    old = _standby(core, vm.id)
    assert old is not None
    child = _link_like_a_fork(core, vm.id)
    mem = core.vms.vm_dir(vm.id) / MEM_NAME
    captured = mem.read_bytes()

    core.snapshots.own_copy_later(vm.id)
    await _copied(core)
    assert old.exit is not None  # it mapped the file the children share
    new = _standby(core, vm.id)
    assert new is not None and new.pid != old.pid
    assert mem.stat().st_nlink == 1 and mem.stat().st_ino != child.stat().st_ino
    assert mem.read_bytes() == captured == child.read_bytes()

    await core.wake.ensure_running(await core.state(vm.id))
    proc = core.host.running(vm.id)
    assert proc is not None and proc.pid == new.pid  # the wake took the new one
    assert child.stat().st_nlink == 1  # the child's file is its alone


async def test_a_vm_woken_before_its_copy_is_left_alone(core: Core) -> None:
    vm = await _asleep(core)
    child = _link_like_a_fork(core, vm.id)
    async with core.vms.locks.hold(vm.id):  # a wake that came first holds the lock
        core.snapshots.own_copy_later(vm.id)
        woken = await core.snapshots.restore_locked(vm, await _latest(core, vm.id))
    assert woken.state == State.RUNNING
    running = core.host.running(vm.id)
    await _copied(core)
    assert core.host.running(vm.id) is running and running is not None
    assert running.state == "running" and core.snapshots.standbys.held() == []
    assert child.stat().st_nlink == 1  # the wake made its copy (frozen.unshare)


async def test_a_restarted_daemon_copies_a_forked_vm_before_its_standby(core: Core) -> None:
    vm = await _asleep(core)
    child = _link_like_a_fork(core, vm.id)
    core.vms.vmm = FakeVMM(core.host, core.vms.vmm.features)  # type: ignore[attr-defined]
    snapshots = SnapshotService(core.settings, core.vms, LocalStore(core.settings.snapshots_dir))
    await reconcile(core.vms, snapshots)
    await snapshots.offer_standbys()
    await asyncio.gather(*snapshots._copying)
    mem = core.vms.vm_dir(vm.id) / MEM_NAME
    assert mem.stat().st_ino != child.stat().st_ino
    assert _standby(core, vm.id) is not None and snapshots.standbys.held() == [vm.id]
    await snapshots.close()


async def test_shutdown_waits_for_a_copy_under_way(core: Core) -> None:
    vm = await _asleep(core)
    _link_like_a_fork(core, vm.id)
    core.snapshots.own_copy_later(vm.id)
    await core.snapshots.close()  # the copy ends, its standby with the others
    assert (core.vms.vm_dir(vm.id) / MEM_NAME).stat().st_nlink == 1
    assert core.host.running(vm.id) is None and core.snapshots.standbys.held() == []
