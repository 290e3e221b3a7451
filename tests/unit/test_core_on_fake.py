"""Error paths of core's wake, reaper, reconciliation, snapshots and liveness, on the fake VMM
(tests/unit/core_on_fake.py): what each leaves behind when the VMM fails or dies, without
booting a guest."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest

from hatchvm.core.forks import ForkService
from hatchvm.core.guest import GuestService
from hatchvm.core.reconcile import reconcile
from hatchvm.core.snapshots import PENDING, STATE_NAME
from hatchvm.core.states import State
from hatchvm.core.vms import DISK_NAME, FORK_PENDING, MEM_NAME, RESUME_DIR
from hatchvm.db import repo
from hatchvm.db.models import VM
from hatchvm.errors import HatchError, NotFound, NotSupported
from hatchvm.reaper import IdleReaper
from hatchvm.vmm.base import Feature, VMMRequestFailed
from hatchvm.vmm.fake import FakeVMM
from tests.support.wait import until
from tests.unit.core_on_fake import USER, Core, make_core

NO_AGENT = "clock not synced, RNG not reseeded: the fake driver has no guest agent"


@pytest.fixture
async def core(tmp_path: Path) -> AsyncIterator[Core]:
    async for made in make_core(tmp_path):
        yield made


async def _snapshots(core: Core, vm_id: str) -> list[object]:
    async with core.vms.sessions() as session:
        return list(await repo.list_snapshots(session, vm_id))


# ---- wake ------------------------------------------------------------------------------


async def test_a_wake_whose_restore_fails_leaves_the_vm_asleep_and_backs_off(core: Core) -> None:
    vm = await core.create()
    await core.snapshots.snapshot(USER, vm.id)
    core.host.fail("restore", VMMRequestFailed("firecracker refused it (400): bad snapshot"))

    with pytest.raises(HatchError) as err:
        await core.wake.ensure_running(await core.state(vm.id))
    assert err.value.status == 503
    assert "bad snapshot" in err.value.message and "next attempt in 5s" in err.value.message
    after = await core.state(vm.id)
    assert after.state == State.SNAPSHOTTED  # as before the wake, and still resumable
    assert after.state_reason is not None and "bad snapshot" in after.state_reason
    assert core.host.running(vm.id) is None, "a failed restore leaves no VMM process"
    assert (core.vms.vm_dir(vm.id) / MEM_NAME).exists()

    with pytest.raises(HatchError):  # backing off: nothing is tried
        await core.wake.ensure_running(after)
    assert [op for op, _ in core.host.calls].count("restore") == 1

    core.host.fail("restore", None)
    core.clock.now += 6
    woken = await core.wake.ensure_running(after)
    assert woken.state == State.RUNNING
    assert core.host.running(vm.id) is not None


async def test_a_wake_cold_boots_a_vm_that_died(core: Core) -> None:
    vm = await core.create()
    core.host.crash(vm.id)
    await until(lambda: _state_is(core, vm.id, State.STOPPED), 5, "the death to be recorded")
    stopped = await core.state(vm.id)
    assert stopped.state_reason is not None and "SIGKILL" in stopped.state_reason
    woken = await core.wake.ensure_running(stopped)
    assert woken.state == State.RUNNING
    assert ("boot", vm.id) in core.host.calls[1:]


async def _failed_wakes_to_error(core: Core, vm_id: str) -> VM:
    """The VM's snapshot cannot be restored: three failed wakes put it in error."""
    core.host.fail("restore", VMMRequestFailed("firecracker refused it (400): bad snapshot"))
    for _ in range(3):
        with pytest.raises(HatchError):
            await core.wake.ensure_running(await core.state(vm_id))
        core.clock.now += 600
    in_error = await core.state(vm_id)
    assert in_error.state == State.ERROR
    core.host.fail("restore", None)
    return in_error


async def test_a_vm_in_error_with_its_disk_can_be_started_again(core: Core) -> None:
    vm = await core.create()
    await core.snapshots.snapshot(USER, vm.id)
    await _failed_wakes_to_error(core, vm.id)
    disk = core.vms.vm_dir(vm.id) / DISK_NAME
    disk.write_bytes(b"the user's work")  # what a cold boot must keep

    started = await core.vms.start(USER, vm.id)
    assert started.state == State.RUNNING and started.state_reason is None
    assert ("boot", vm.id) in core.host.calls[1:]
    assert disk.read_bytes() == b"the user's work"
    with pytest.raises(HatchError) as err:  # running now: the usual rules again
        await core.vms.start(USER, vm.id)
    assert (err.value.status, err.value.message) == (409, "vm is running, must be stopped")


async def test_a_vm_in_error_can_be_restored_from_a_snapshot(core: Core) -> None:
    vm = await core.create()
    snap = await core.snapshots.snapshot(USER, vm.id)
    await _failed_wakes_to_error(core, vm.id)
    restored = await core.snapshots.restore(USER, vm.id, snap.id)
    assert restored.state == State.RUNNING
    assert core.host.running(vm.id) is not None


async def test_a_vm_in_error_without_a_disk_cannot_be_started_or_restored(core: Core) -> None:
    vm = await core.create()
    snap = await core.snapshots.snapshot(USER, vm.id)
    in_error = await _failed_wakes_to_error(core, vm.id)
    (core.vms.vm_dir(vm.id) / DISK_NAME).unlink()
    for attempt in (
        core.vms.start(USER, vm.id),
        core.snapshots.restore(USER, vm.id, snap.id),
    ):
        with pytest.raises(HatchError) as err:
            await attempt
        assert err.value.status == 409
        assert err.value.message == (
            f"vm {vm.id} is in error ({in_error.state_reason}) and has no disk left; delete it"
        )
    after = await core.state(vm.id)
    assert (after.state, after.state_reason) == (State.ERROR, in_error.state_reason)
    assert core.host.running(vm.id) is None


async def test_a_run_that_takes_the_place_of_an_ending_one_is_watched(core: Core) -> None:
    """A create whose start from a template fails after its VMM ran boots the VM again under
    the same lock: the first run's watch, waiting for that lock, goes on with the new run
    (whose own watch() found it going on), so the new run's death is still seen."""
    vm = await core.create()
    async with core.vms.locks.hold(vm.id):
        await core.vms.vmm.kill(vm.id, core.vms.vm_dir(vm.id))
        await asyncio.sleep(0.05)  # the watch sees the end, and waits for the lock
        await core.vms.boot(vm, await core.vms.image_files(vm))
    await asyncio.sleep(0.05)  # the watch takes the lock, finds the new run alive
    assert core.host.running(vm.id) is not None
    core.host.crash(vm.id)
    await until(lambda: _state_is(core, vm.id, State.STOPPED), 5, "the death to be recorded")


async def _state_is(core: Core, vm_id: str, state: State) -> bool:
    return (await core.state(vm_id)).state == state


# ---- the reaper ------------------------------------------------------------------------


class _AllRoutesWake:
    def wakes(self, vm_id: str) -> bool:
        return True


async def test_the_reaper_skips_a_vm_in_use_and_snapshots_it_once_idle(core: Core) -> None:
    vm = await core.create()
    reaper = IdleReaper(core.settings, core.snapshots, _AllRoutesWake(), core.activity)  # type: ignore[arg-type]
    long_ago = datetime.now(UTC) - timedelta(seconds=core.settings.idle_timeout + 60)
    opened = core.activity.open(vm.id)  # a connection held open for over an hour (SSH)
    await asyncio.gather(*core.activity._pending)
    await core.vms.update(vm.id, last_activity_at=long_ago)

    assert await reaper.sweep() == []
    assert (await core.state(vm.id)).state == State.RUNNING
    assert ("snapshot", vm.id) not in core.host.calls

    core.activity.close(vm.id, opened)
    await asyncio.gather(*core.activity._pending)
    await core.vms.update(vm.id, last_activity_at=long_ago)
    assert await reaper.sweep() == [vm.id]
    assert (await core.state(vm.id)).state == State.SNAPSHOTTED


async def test_the_reaper_leaves_vms_whose_driver_cannot_snapshot(tmp_path: Path) -> None:
    async for core in make_core(tmp_path, features=Feature.NONE):
        vm = await core.create()
        reaper = IdleReaper(core.settings, core.snapshots, _AllRoutesWake(), core.activity)  # type: ignore[arg-type]
        long_ago = datetime.now(UTC) - timedelta(seconds=core.settings.idle_timeout + 60)
        await core.vms.update(vm.id, last_activity_at=long_ago)
        assert await reaper.sweep() == []
        assert (await core.state(vm.id)).state == State.RUNNING


# ---- snapshots -------------------------------------------------------------------------


async def test_a_snapshot_whose_capture_fails_resumes_the_guest(core: Core) -> None:
    vm = await core.create()
    core.host.fail("snapshot", VMMRequestFailed("the microVM is not paused"))
    with pytest.raises(HatchError) as err:
        await core.snapshots.snapshot(USER, vm.id)
    assert err.value.status == 500
    assert (
        "the microVM is not paused" in err.value.message and "(vm is running)" in err.value.message
    )
    after = await core.state(vm.id)
    # Resumed, and told that nothing could set its clock (the fake driver has no agent).
    assert after.state == State.RUNNING
    assert after.state_reason == NO_AGENT
    assert core.host.running(vm.id) is not None
    assert ("resume_if_paused", vm.id) in core.host.calls
    assert not (core.vms.vm_dir(vm.id) / RESUME_DIR).exists()
    assert await _snapshots(core, vm.id) == []


async def test_a_snapshot_whose_capture_fails_on_a_dead_guest_stops_the_vm(core: Core) -> None:
    vm = await core.create()
    core.host.fail("snapshot", VMMRequestFailed("the process is gone"))
    core.host.fail("resume_if_paused", VMMRequestFailed("no answer"))
    with pytest.raises(HatchError) as err:
        await core.snapshots.snapshot(USER, vm.id)
    assert "(vm is stopped)" in err.value.message
    after = await core.state(vm.id)
    assert after.state == State.STOPPED
    assert after.state_reason == "snapshot failed, guest lost: snapshot of " + (
        f"{vm.id}: the process is gone"
    )
    assert core.host.running(vm.id) is None
    assert not (core.vms.vm_dir(vm.id) / MEM_NAME).exists()


async def test_without_the_snapshot_capability_snapshot_and_restore_are_501(
    tmp_path: Path,
) -> None:
    async for core in make_core(tmp_path, features=Feature.NONE):
        vm = await core.create()
        with pytest.raises(NotSupported) as err:
            await core.snapshots.snapshot(USER, vm.id)
        assert err.value.status == 501
        assert err.value.message == (f"the fake driver does not support snapshots yet (vm {vm.id})")
        with pytest.raises(NotSupported):
            await core.snapshots.restore(USER, vm.id)
        assert (await core.state(vm.id)).state == State.RUNNING
        assert [op for op, _ in core.host.calls] == ["boot", "resume"]


async def test_without_a_console_the_console_is_501_and_never_opened(core: Core) -> None:
    vm = await core.create()
    with pytest.raises(NotSupported) as err:
        await core.vms.require(Feature.CONSOLE, vm.id)
    assert (
        err.value.message == f"the fake driver does not support console recording yet (vm {vm.id})"
    )
    assert not (core.vms.vm_dir(vm.id) / "console.log").exists()


async def test_without_the_agent_exec_and_files_are_501_and_nothing_is_woken(
    core: Core,
) -> None:
    """Checked after ownership (another user's VM stays 404) and before any wake."""
    guest = GuestService(core.settings, core.vms, core.wake, core.activity)
    vm = await core.create()
    await core.snapshots.snapshot(USER, vm.id)
    calls = len(core.host.calls)
    with pytest.raises(NotFound):
        async with guest.agent("mallory", vm.id, "exec"):
            pass
    for capability in ("exec", "files"):
        with pytest.raises(NotSupported) as err:
            async with guest.agent(USER, vm.id, capability):
                pass
        assert err.value.message == (
            f"the fake driver does not support the guest agent yet (vm {vm.id})"
        )
    assert (await core.state(vm.id)).state == State.SNAPSHOTTED
    assert len(core.host.calls) == calls


async def test_without_the_fork_capability_fork_is_501_and_the_parent_untouched(
    core: Core,
) -> None:
    guest = GuestService(core.settings, core.vms, core.wake, core.activity)
    leftover = core.settings.data_dir / "forks" / "fork-left"  # a daemon died mid-fork
    leftover.mkdir(parents=True)
    forks = ForkService(core.settings, core.vms, core.snapshots, guest)
    assert not leftover.exists()
    vm = await core.create()
    calls = len(core.host.calls)
    with pytest.raises(NotFound):
        await forks.fork_vm("mallory", vm.id, 1)
    with pytest.raises(NotSupported) as err:
        await forks.fork_vm(USER, vm.id, 1)
    assert err.value.message == f"the fake driver does not support fork yet (vm {vm.id})"
    assert len(core.host.calls) == calls and len(await core.vms.list(USER)) == 1


# ---- reconciliation after a crash mid-snapshot -----------------------------------------


async def _crashed_mid_snapshot(core: Core, *, process_alive: bool, state_saved: bool) -> str:
    """A VM as a daemon killed during a snapshot leaves it: `snapshotting`, resume/PENDING
    written, the VMM paused (or gone), the state file written or not."""
    vm = await core.create()
    resume = core.vms.vm_dir(vm.id) / RESUME_DIR
    resume.mkdir()
    (resume / PENDING).write_text("snap_interrupted")
    await core.vms.update(vm.id, state=State.SNAPSHOTTING)
    if state_saved:
        vm_dir = core.vms.vm_dir(vm.id)
        await core.vms.vmm.snapshot(vm.id, vm_dir, resume / STATE_NAME)  # ends the process
    elif not process_alive:
        core.host.crash(vm.id)
    else:
        core.host.processes[vm.id].state = "paused"
    return vm.id


async def _restart(core: Core) -> FakeVMM:
    """A new daemon: a new driver object on the same host, reconciling at start-up."""
    vmm = FakeVMM(core.host, core.vms.vmm.features)  # type: ignore[attr-defined]
    core.vms.vmm = vmm
    await reconcile(core.vms, core.snapshots)
    return vmm


async def test_reconcile_after_a_crash_mid_snapshot_with_the_vmm_alive(core: Core) -> None:
    vm_id = await _crashed_mid_snapshot(core, process_alive=True, state_saved=False)
    await _restart(core)
    after = await core.state(vm_id)
    assert after.state == State.RUNNING
    proc = core.host.running(vm_id)
    assert proc is not None and proc.state == "running"
    assert not (core.vms.vm_dir(vm_id) / RESUME_DIR).exists()
    assert core.host.settled[-1] == [vm_id]


async def test_reconcile_after_a_crash_while_storing_resumes_from_local_files(core: Core) -> None:
    vm_id = await _crashed_mid_snapshot(core, process_alive=False, state_saved=True)
    await _restart(core)
    after = await core.state(vm_id)
    assert after.state == State.RUNNING
    assert after.state_reason == (
        f"daemon restarted while storing a snapshot; vm resumed; {NO_AGENT}"
    )
    assert ("restore", vm_id) in core.host.calls
    assert await _snapshots(core, vm_id) == []


async def test_reconcile_after_a_crash_mid_snapshot_with_the_vmm_dead(core: Core) -> None:
    vm_id = await _crashed_mid_snapshot(core, process_alive=False, state_saved=False)
    await _restart(core)
    after = await core.state(vm_id)
    assert after.state == State.STOPPED
    assert after.state_reason == "daemon died during a snapshot; the guest's memory is lost"
    assert core.host.running(vm_id) is None
    assert not (core.vms.vm_dir(vm_id) / MEM_NAME).exists()


async def test_reconcile_reattaches_running_vms_and_marks_dead_ones(core: Core) -> None:
    alive = await core.create()
    dead = await core.create()
    core.host.crash(dead.id)
    await until(lambda: _state_is(core, dead.id, State.STOPPED), 5, "the death to be recorded")
    await core.vms.update(dead.id, state=State.RUNNING)  # as if the daemon had missed it
    await _restart(core)
    assert (await core.state(alive.id)).state == State.RUNNING
    gone = await core.state(dead.id)
    assert gone.state == State.STOPPED
    assert gone.state_reason == "vmm process gone at daemon start-up (was running)"


async def test_reconcile_discards_a_fork_child_the_daemon_died_making(core: Core) -> None:
    """Its VMM alive, but its agent never re-made it: it must not run on."""
    vm = await core.create()
    await core.vms.update(vm.id, state=State.STARTING)
    (core.vms.vm_dir(vm.id) / FORK_PENDING).touch()
    await _restart(core)
    after = await core.state(vm.id)
    assert after.state == State.ERROR and after.guest_ip is None
    assert after.state_reason == "its fork was interrupted by a daemon restart"
    assert core.host.running(vm.id) is None
    # Positive control: a VM left starting without the mark is reattached and runs.
    other = await core.create()
    await core.vms.update(other.id, state=State.STARTING)
    await _restart(core)
    assert (await core.state(other.id)).state == State.RUNNING
