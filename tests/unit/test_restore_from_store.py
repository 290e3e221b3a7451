"""A restore that reads the chunk store (a snapshot other than the one the VM's files hold),
on the fake VMM: the VMM starts while the snapshot's files are being filled, a fill that fails
puts the VM's files back as they were, and the files a restore replaced are deleted off its
path (and at start-up, if a daemon died before)."""

from __future__ import annotations

import hashlib
import os
import re
import threading
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from hatchvm.core.reconcile import reconcile
from hatchvm.core.snapshots import LATEST, PREVIOUS_DIR, RETIRED
from hatchvm.core.states import State
from hatchvm.core.vms import DISK_NAME, MEM_NAME, RESUME_DIR
from hatchvm.db.models import VM, Snapshot
from hatchvm.errors import HatchError
from hatchvm.snapshots.chunks import RestorePlan, namespace
from hatchvm.vmm.base import BootSpec, VMMError
from tests.support.wait import until
from tests.unit.core_on_fake import USER, Core, make_core

PAGE = 4096


@pytest.fixture
async def core(tmp_path: Path) -> AsyncIterator[Core]:
    async for made in make_core(tmp_path):
        yield made


def _write_pages(mem: Path, fill: bytes) -> None:
    """What the guest did: a few pages of its RAM written with one byte."""
    fd = os.open(mem, os.O_WRONLY)
    try:
        for page in (0, 7, 300, 4095):
            os.pwrite(fd, fill * PAGE, page * PAGE)
    finally:
        os.close(fd)


def _digests(vm_dir: Path) -> dict[str, str]:
    files = [vm_dir / MEM_NAME, vm_dir / DISK_NAME, *sorted((vm_dir / RESUME_DIR).iterdir())]
    return {str(f.relative_to(vm_dir)): hashlib.sha256(f.read_bytes()).hexdigest() for f in files}


async def _two_snapshots(core: Core) -> tuple[VM, Snapshot, Snapshot]:
    """A VM snapshotted twice, its RAM different each time; it sleeps on the second."""
    vm = await core.create()
    mem = core.vms.vm_dir(vm.id) / MEM_NAME
    _write_pages(mem, b"A")
    first = await core.snapshots.snapshot(USER, vm.id)
    await core.snapshots.restore(USER, vm.id)  # its own files: no store read
    _write_pages(mem, b"B")
    second = await core.snapshots.snapshot(USER, vm.id)
    for snap in (first, second):
        await core.snapshots.storing.wait(snap.id)
    return vm, first, second


async def test_the_vmm_starts_while_the_files_are_filled(
    core: Core, monkeypatch: pytest.MonkeyPatch
) -> None:
    vm, first, _ = await _two_snapshots(core)
    started = threading.Event()
    seen_during_fill: list[bool] = []
    vmm_start, fill = core.vms.vmm.start_incoming, core.snapshots.chunks.fill

    async def start_incoming(spec: BootSpec) -> bool:
        ahead = await vmm_start(spec)
        started.set()
        return ahead

    def filling(plan: RestorePlan, dests: dict[str, Path]) -> None:
        # The fill runs in a thread: had the VMM waited for it, this would wait in vain.
        seen_during_fill.append(started.wait(10))
        fill(plan, dests)

    monkeypatch.setattr(core.vms.vmm, "start_incoming", start_incoming)
    monkeypatch.setattr(core.snapshots.chunks, "fill", filling)
    restored = await core.snapshots.restore(USER, vm.id, first.id)

    assert restored.state == State.RUNNING
    assert seen_during_fill == [True]
    with (core.vms.vm_dir(vm.id) / MEM_NAME).open("rb") as mem:  # the first snapshot's RAM
        assert mem.read(PAGE) == b"A" * PAGE
        mem.seek(300 * PAGE)
        assert mem.read(PAGE) == b"A" * PAGE


async def test_a_fill_that_fails_puts_the_vms_files_back(core: Core) -> None:
    vm, first, second = await _two_snapshots(core)
    vm_dir = core.vms.vm_dir(vm.id)
    before = _digests(vm_dir)
    assert (vm_dir / RESUME_DIR / LATEST).read_text().split()[0] == second.id  # it is hot
    # Its blocks fail their checksums; its listing and pack indexes are intact, so the
    # restore gets as far as laying out the files and filling them.
    packs = core.settings.snapshots_dir / "users" / namespace(USER) / "packs"
    for pack in packs.glob("*.pack"):
        data = bytearray(pack.read_bytes())
        data[len(data) // 2] ^= 0xFF
        pack.write_bytes(bytes(data))

    with pytest.raises(HatchError) as err:
        await core.snapshots.restore(USER, vm.id, first.id)
    assert err.value.status == 500
    assert f"snapshot {first.id} cannot be restored" in err.value.message
    assert re.search(r"block \d+ of pack \w+ fails its checksum", err.value.message)

    after = await core.state(vm.id)
    assert (after.state, after.state_reason) == (State.SNAPSHOTTED, None)
    assert core.host.running(vm.id) is None
    assert _digests(vm_dir) == before  # the second snapshot's files, still marked as it
    assert not (vm_dir / PREVIOUS_DIR).exists()
    resumed = await core.snapshots.restore(USER, vm.id)  # from them, without the store
    assert resumed.state == State.RUNNING


async def test_a_failed_restore_from_the_vms_own_files_is_made_from_the_store(
    core: Core, monkeypatch: pytest.MonkeyPatch
) -> None:
    vm, _, second = await _two_snapshots(core)
    vm_dir = core.vms.vm_dir(vm.id)
    files = (vm_dir / MEM_NAME, vm_dir / DISK_NAME)
    hot = [f.read_bytes() for f in files]  # the second snapshot's, which the VM sleeps on
    calls: list[bool] = []  # whether each restore ran on a snapshot laid out from the store
    vmm_restore = core.vms.vmm.restore

    async def restore(spec: BootSpec, state_file: Path) -> int:
        calls.append((vm_dir / PREVIOUS_DIR).exists())
        if len(calls) == 1:
            raise VMMError("migration on it failed: qemu said: a damaged state")
        return await vmm_restore(spec, state_file)

    monkeypatch.setattr(core.vms.vmm, "restore", restore)
    resumed = await core.snapshots.restore(USER, vm.id)
    assert resumed.state == State.RUNNING
    assert "restore failed" not in (resumed.state_reason or "")  # the failure is history
    assert calls == [False, True]
    assert [f.read_bytes() for f in files] == hot  # the same bytes, from the store
    assert core.host.running(vm.id) is not None
    assert second.id in [s.id for s in await core.snapshots.list(USER, vm.id)]


async def test_a_failed_restore_from_the_store_is_not_made_again(
    core: Core, monkeypatch: pytest.MonkeyPatch
) -> None:
    vm, first, _ = await _two_snapshots(core)
    calls = 0

    async def restore(spec: BootSpec, state_file: Path) -> int:
        nonlocal calls
        calls += 1
        raise VMMError("migration on it failed")

    monkeypatch.setattr(core.vms.vmm, "restore", restore)
    with pytest.raises(HatchError) as err:
        await core.snapshots.restore(USER, vm.id, first.id)
    assert err.value.status == 500 and "migration on it failed" in err.value.message
    assert calls == 1
    assert (await core.state(vm.id)).state == State.SNAPSHOTTED


async def test_replaced_files_are_deleted_in_the_background_and_at_start_up(core: Core) -> None:
    vm, first, _ = await _two_snapshots(core)
    vm_dir = core.vms.vm_dir(vm.id)
    await core.snapshots.restore(USER, vm.id, first.id)
    assert not (vm_dir / PREVIOUS_DIR).exists()  # renamed at once: never put back
    await until(lambda: not list(vm_dir.glob(f"{RETIRED}*")), 5, "the old files to go")

    left = vm_dir / f"{RETIRED}left-by-a-dead-daemon"  # its delete never ran
    left.mkdir()
    (left / MEM_NAME).write_bytes(b"old memory")
    await reconcile(core.vms, core.snapshots)
    assert not left.exists()
    assert (vm_dir / MEM_NAME).exists() and (await core.state(vm.id)).state == State.RUNNING
