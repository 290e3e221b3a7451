"""The VMM driver contract (vmm/base.py's VMM protocol), one case at a time, for every driver
(see conftest.py): what core relies on, and nothing a driver may do differently."""

from __future__ import annotations

import asyncio
import dataclasses
import json
import os
import signal
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest

from hatchvm.core.console import CONSOLE_LOG, Consoles
from hatchvm.vmm.base import (
    VMM,
    ExitInfo,
    Feature,
    VMMError,
    VMMFilesMissing,
    VMMNotRunning,
)
from tests.contract.conftest import Kit
from tests.support.wait import until

BOOT_OUTPUT_TIMEOUT = 120.0  # a real guest under TCG prints its first line within seconds


async def _running(kit: Kit, vmm: VMM, vm_id: str, consoles: Consoles | None = None) -> int:
    """Boot the VM (paused), record its console where the driver has one, let it run."""
    spec = kit.spec(vm_id)
    pid = await vmm.boot(spec)
    assert pid > 0
    assert await vmm.alive(vm_id, spec.vm_dir) == pid
    if consoles is not None and Feature.CONSOLE in (await vmm.capabilities()).features:
        await consoles.record(vm_id, spec.vm_dir, vmm.console_socket(spec.vm_dir))
    await vmm.resume(vm_id, spec.vm_dir)
    return pid


async def test_boot_is_paused_until_resume_and_the_console_is_recorded(
    kit: Kit, vm_id: str
) -> None:
    vmm = kit.make()
    spec = kit.spec(vm_id)
    consoles = Consoles(1 << 20)
    await vmm.boot(spec)
    features = (await vmm.capabilities()).features
    if Feature.CONSOLE in features:
        await consoles.record(vm_id, spec.vm_dir, vmm.console_socket(spec.vm_dir))
        await asyncio.sleep(0)  # the recorder gets its chance to read
        assert Consoles.tail(spec.vm_dir, 4096) == b"", "a paused guest printed something"
    assert await vmm.resume_if_paused(vm_id, spec.vm_dir) is True
    assert await vmm.resume_if_paused(vm_id, spec.vm_dir) is True  # running: nothing to do
    if Feature.CONSOLE in features:
        await until(
            lambda: (spec.vm_dir / CONSOLE_LOG).exists() and Consoles.tail(spec.vm_dir, 4096),
            BOOT_OUTPUT_TIMEOUT,
            "the guest's console output",
        )
    await vmm.kill(vm_id, spec.vm_dir)
    await consoles.close()


async def test_stop_ends_the_vmm_and_is_idempotent(kit: Kit, vm_id: str) -> None:
    vmm = kit.make()
    await _running(kit, vmm, vm_id)
    vm_dir = kit.vms_dir / vm_id
    await vmm.stop(vm_id, vm_dir, timeout=5.0)
    assert await vmm.alive(vm_id, vm_dir) is None
    await vmm.stop(vm_id, vm_dir, timeout=5.0)  # nothing left to stop: no error
    assert vm_id not in await vmm.processes(kit.vms_dir)


async def test_stop_kills_a_guest_that_ignores_it(kit: Kit, vm_id: str) -> None:
    vmm = kit.make()
    vm_dir = kit.vms_dir / vm_id
    if kit.stubborn is not None:
        kit.stubborn()
        await _running(kit, vmm, vm_id)
    else:
        await vmm.boot(kit.spec(vm_id))  # a guest not yet booted cannot hear a power button
    await vmm.stop(vm_id, vm_dir, timeout=1.0)
    assert await vmm.alive(vm_id, vm_dir) is None


async def test_kill_ends_the_vmm_and_is_idempotent(kit: Kit, vm_id: str) -> None:
    vmm = kit.make()
    await _running(kit, vmm, vm_id)
    vm_dir = kit.vms_dir / vm_id
    await vmm.kill(vm_id, vm_dir)
    assert await vmm.alive(vm_id, vm_dir) is None
    await vmm.kill(vm_id, vm_dir)


async def test_wait_exit_sees_a_death_behind_the_drivers_back(kit: Kit, vm_id: str) -> None:
    vmm = kit.make()
    await _running(kit, vmm, vm_id)
    vm_dir = kit.vms_dir / vm_id
    watch = asyncio.create_task(vmm.wait_exit(vm_id, vm_dir))
    await asyncio.sleep(0)
    assert not watch.done()
    await kit.crash(vmm, vm_id, vm_dir)
    info = await asyncio.wait_for(watch, 30)
    assert isinstance(info, ExitInfo)
    assert not info.clean
    # Exit statuses reach only the process's reaper, which this test may not be.
    assert info.signal in (signal.SIGKILL, None)
    assert await vmm.alive(vm_id, vm_dir) is None


async def test_wait_exit_of_a_vm_without_a_process_returns_at_once(kit: Kit, vm_id: str) -> None:
    vmm = kit.make()
    info = await asyncio.wait_for(vmm.wait_exit(vm_id, kit.vms_dir / vm_id), 5)
    assert info.exit_code is None and info.signal is None


async def test_snapshot_then_restore(kit: Kit, vm_id: str) -> None:
    vmm = kit.make()
    if not (await vmm.capabilities()).snapshots:
        pytest.skip(f"{kit.name} declares no snapshots")
    await _running(kit, vmm, vm_id)
    spec = kit.spec(vm_id)
    state = spec.vm_dir / "state"
    await vmm.snapshot(vm_id, spec.vm_dir, state)
    assert await vmm.alive(vm_id, spec.vm_dir) is None, "a snapshot ends the VMM process"
    assert state.stat().st_size > 0
    assert spec.mem_file is not None and spec.mem_file.stat().st_size == spec.mem_mib << 20
    pid = await vmm.restore(spec, state)
    assert await vmm.alive(vm_id, spec.vm_dir) == pid
    await vmm.resume(vm_id, spec.vm_dir)
    # The memory file is intact: the same snapshot restores again.
    await vmm.kill(vm_id, spec.vm_dir)
    await vmm.restore(spec, state)
    assert await vmm.resume_if_paused(vm_id, spec.vm_dir) is True
    await vmm.stop(vm_id, spec.vm_dir, timeout=5.0)
    assert await vmm.alive(vm_id, spec.vm_dir) is None


async def test_a_new_driver_object_reattaches_to_a_running_vm(kit: Kit, vm_id: str) -> None:
    first = kit.make()
    pid = await _running(kit, first, vm_id)
    vm_dir = kit.vms_dir / vm_id
    second = kit.make()  # the daemon restarted: nothing in memory, the VMM still runs
    assert await second.alive(vm_id, vm_dir) == pid
    assert (await second.processes(kit.vms_dir)).get(vm_id) == pid
    assert await second.resume_if_paused(vm_id, vm_dir) is True
    watch = asyncio.create_task(second.wait_exit(vm_id, vm_dir))
    await asyncio.sleep(0)
    await second.kill(vm_id, vm_dir)
    await asyncio.wait_for(watch, 30)
    assert await first.alive(vm_id, vm_dir) is None


async def test_a_snapshot_after_a_reattach(kit: Kit, vm_id: str) -> None:
    first = kit.make()
    if not (await first.capabilities()).snapshots:
        pytest.skip(f"{kit.name} declares no snapshots")
    await _running(kit, first, vm_id)
    second = kit.make()
    spec = kit.spec(vm_id)
    await second.snapshot(vm_id, spec.vm_dir, spec.vm_dir / "state")
    await second.restore(spec, spec.vm_dir / "state")
    await second.kill(vm_id, spec.vm_dir)


# ---- error paths -----------------------------------------------------------------------


async def test_boot_with_a_missing_disk_fails_and_leaves_no_process(kit: Kit, vm_id: str) -> None:
    vmm = kit.make()
    spec = kit.spec(vm_id)
    spec.disk.unlink()
    with pytest.raises(VMMError) as err:
        await vmm.boot(spec)
    assert vm_id in str(err.value)
    assert await vmm.alive(vm_id, spec.vm_dir) is None
    assert vm_id not in await vmm.processes(kit.vms_dir)


async def test_restore_without_its_files_fails_clearly(kit: Kit, vm_id: str) -> None:
    vmm = kit.make()
    spec = kit.spec(vm_id)
    with pytest.raises(VMMFilesMissing) as err:
        await vmm.restore(spec, spec.vm_dir / "no-such-state")
    assert err.value.vm_id == vm_id and err.value.op == "restore"
    assert await vmm.alive(vm_id, spec.vm_dir) is None


async def test_restore_from_a_bad_state_file_fails_and_leaves_no_process(
    kit: Kit, vm_id: str
) -> None:
    vmm = kit.make()
    if not (await vmm.capabilities()).snapshots:
        pytest.skip(f"{kit.name} declares no snapshots")
    await _running(kit, vmm, vm_id)
    spec = kit.spec(vm_id)
    state = spec.vm_dir / "state"
    await vmm.snapshot(vm_id, spec.vm_dir, state)
    state.write_text(json.dumps({"not": "a state file"}))
    with pytest.raises(VMMError) as err:
        await vmm.restore(spec, state)
    assert vm_id in str(err.value)
    assert await vmm.alive(vm_id, spec.vm_dir) is None


async def test_operations_on_a_dead_vm_fail_clearly(kit: Kit, vm_id: str) -> None:
    vmm = kit.make()
    await _running(kit, vmm, vm_id)
    vm_dir = kit.vms_dir / vm_id
    await kit.crash(vmm, vm_id, vm_dir)
    await until(lambda: _gone(vmm, vm_id, vm_dir), 30, "the VMM process to be gone")
    if (await vmm.capabilities()).snapshots:
        with pytest.raises(VMMNotRunning) as err:
            await vmm.snapshot(vm_id, vm_dir, vm_dir / "state")
        assert err.value.vm_id == vm_id and err.value.op == "snapshot"
    with pytest.raises(VMMError) as failed:
        await vmm.resume(vm_id, vm_dir)
    assert vm_id in str(failed.value)
    assert await vmm.resume_if_paused(vm_id, vm_dir) is False
    await vmm.stop(vm_id, vm_dir, timeout=1.0)  # idempotent on a dead VM
    await vmm.kill(vm_id, vm_dir)


async def _gone(vmm: VMM, vm_id: str, vm_dir: Path) -> bool:
    return await vmm.alive(vm_id, vm_dir) is None


@pytest.fixture
def tap(vm_id: str) -> Iterator[str]:
    """A TAP device in the test's network namespace (pytest runs in a fresh one as root)."""
    if os.geteuid() != 0:
        pytest.skip("making a TAP device needs root")
    name = "hvc" + vm_id[-8:]
    subprocess.run(["ip", "tuntap", "add", "dev", name, "mode", "tap"], check=True)
    yield name
    subprocess.run(["ip", "link", "del", name], check=False, capture_output=True)


async def test_a_vm_with_a_nic_on_its_tap_boots_snapshots_and_restores(
    kit: Kit, vm_id: str, tap: str
) -> None:
    vmm = kit.make()
    spec = dataclasses.replace(kit.spec(vm_id), tap_name=tap, guest_mac="02:00:00:00:00:2a")
    await vmm.boot(spec)
    await vmm.resume(vm_id, spec.vm_dir)
    if (await vmm.capabilities()).snapshots:
        await vmm.snapshot(vm_id, spec.vm_dir, spec.vm_dir / "state")
        await vmm.restore(spec, spec.vm_dir / "state")
        await vmm.resume(vm_id, spec.vm_dir)
    assert await vmm.alive(vm_id, spec.vm_dir) is not None
    await vmm.kill(vm_id, spec.vm_dir)


async def test_a_vmm_that_cannot_start_fails_at_once_with_its_reason(kit: Kit, vm_id: str) -> None:
    vmm = kit.make()
    spec = kit.spec(vm_id)
    missing = kit.vms_dir / "no-such-kernel"
    # QEMU boots the kernel, Firecracker its uncompressed vmlinux: both are taken away.
    spec = dataclasses.replace(
        spec, kernel=missing, vmlinux=None if spec.vmlinux is None else missing
    )
    with pytest.raises(VMMError, match="no-such-kernel"):
        await asyncio.wait_for(vmm.boot(spec), 60)
    assert await vmm.alive(vm_id, spec.vm_dir) is None
    # The same driver boots a good spec (the failure was the kernel, not the driver).
    await _running(kit, vmm, vm_id)
