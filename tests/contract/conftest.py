"""One driver contract, every driver: each case in test_driver_contract.py runs against

- `fake`: the in-memory driver (vmm/fake.py);
- `firecracker-double`: the Firecracker driver against the API double
  (tests/support/firecracker_double.py) given as its binary;
- `firecracker-jailed`: the same under the jailer double (tests/support/jailer_double.py): each
  VM's double runs chrooted in its jail as its own uid, so every file the driver hands it must
  be placed in the jail with access for that uid (needs root);
- `qemu` (marked vm): the QEMU driver booting the default guest image for real;
- `firecracker` (marked vm): the Firecracker driver with a real Firecracker
  (HATCH_FIRECRACKER_BIN) and the default image's vmlinux; skipped, with the reason, where
  there is no binary or KVM does not run guests.
"""

from __future__ import annotations

import os
import shutil
import signal
import tempfile
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from hatchvm.ids import new_id
from hatchvm.private import PRIVATE_UMASK
from hatchvm.vmm.base import VMM, BootSpec
from hatchvm.vmm.fake import FakeHost, FakeVMM
from hatchvm.vmm.fc_jail import Jailer, UidRange
from hatchvm.vmm.firecracker import FirecrackerVMM

JAIL_UIDS = UidRange(910_000, 64)  # no account on a test host has these

DRIVERS = [
    "fake",
    "firecracker-double",
    "firecracker-jailed",
    pytest.param("qemu", marks=pytest.mark.vm),
    pytest.param("firecracker", marks=pytest.mark.vm),
]


@dataclass
class Kit:
    """One driver under test, with what the contract cases need around it."""

    name: str
    make: Callable[[], VMM]  # a driver object; a second one is a restarted daemon's
    files: dict[str, Path]  # kernel, vmlinux, initrd, rootfs
    vms_dir: Path
    # The VM's VMM process dies behind the driver's back.
    crash: Callable[[VMM, str, Path], Awaitable[None]]
    # From now on guests ignore a graceful stop; None where that cannot be arranged.
    stubborn: Callable[[], None] | None
    real_guest: bool = False  # a guest really boots (its console talks; it takes seconds)
    made: list[Path] = field(default_factory=list)

    def spec(self, vm_id: str, mem_mib: int = 128) -> BootSpec:
        vm_dir = self.vms_dir / vm_id
        vm_dir.mkdir(parents=True, exist_ok=True)
        disk = vm_dir / "disk.ext4"
        if not disk.exists():
            _make_disk(disk, vm_id, self.real_guest)
        return BootSpec(
            vm_id=vm_id,
            vm_dir=vm_dir,
            kernel=self.files["kernel"],
            vmlinux=self.files["vmlinux"],
            initrd=self.files["initrd"],
            rootfs=self.files["rootfs"],
            disk=disk,
            vcpu_count=1,
            mem_mib=mem_mib,
            cmdline=self.files.get("cmdline", Path("console=ttyS0")).as_posix(),
            mem_file=vm_dir / "mem",
        )


def _make_disk(disk: Path, vm_id: str, real: bool) -> None:
    if real:
        from hatchvm.images.disk import create_vm_disk

        create_vm_disk(disk, 64, vm_id.replace("_", "-"), None)
    else:
        disk.write_bytes(b"\0" * 4096)
        disk.chmod(0o600)  # hatchd's disks are root's alone


async def _kill_process(vmm: VMM, vm_id: str, vm_dir: Path) -> None:
    pid = await vmm.alive(vm_id, vm_dir)
    assert pid is not None, "the VM should be running before it crashes"
    os.kill(pid, signal.SIGKILL)


def _stubborn_double(root: Path) -> None:
    from tests.support.firecracker_double import launcher

    launcher(root, guest="stubborn")


def _dummy_files(root: Path) -> dict[str, Path]:
    files = {}
    for role in ("kernel", "vmlinux", "initrd", "rootfs"):
        files[role] = root / role
        files[role].write_bytes(b"\0" * 4096)
        files[role].chmod(0o400)  # as the image builder leaves them: read-only, root's
    return files


def _image_files() -> dict[str, Path]:
    from hatchvm.images.builder import current_artifacts
    from tests.support.image import TEST_IMAGE_DIR

    image = current_artifacts(TEST_IMAGE_DIR)
    if image is None:
        pytest.skip(f"the default guest image is not built in {TEST_IMAGE_DIR}")
    return {
        "kernel": image.kernel,
        "vmlinux": image.vmlinux,
        "initrd": image.initrd,
        "rootfs": image.rootfs,
        "cmdline": Path(image.boot_args + " hatch.hostname=contract"),
    }


async def _kvm_problem() -> str | None:
    from hatchvm.vmm.accel import probe

    if not os.access("/dev/kvm", os.R_OK | os.W_OK):
        return "/dev/kvm is missing or not accessible"
    return await probe("qemu-system-x86_64", "kvm")


@pytest.fixture(params=DRIVERS)
async def kit(
    request: pytest.FixtureRequest,
) -> AsyncIterator[Kit]:
    # Short paths: the drivers' sockets live under run_dir (Unix socket paths <= 108 bytes).
    root = Path(tempfile.mkdtemp(prefix="hvc-", dir="/tmp"))
    umask = os.umask(0o022)
    os.umask(umask)
    try:
        async for kit in _kits(request.param, root):
            yield kit
    finally:
        shutil.rmtree(root, ignore_errors=True)
        os.umask(umask)


async def _kits(name: str, root: Path) -> AsyncIterator[Kit]:
    """The kit for one driver (skips where it cannot run); its VMM processes end after."""
    run_dir, vms_dir = root / "run", root / "vms"
    vms_dir.mkdir()
    kit: Kit
    if name == "fake":
        host = FakeHost()

        async def crash(_vmm: VMM, vm_id: str, _vm_dir: Path) -> None:
            host.crash(vm_id)

        def stubborn() -> None:
            host.stubborn = True

        kit = Kit(name, lambda: FakeVMM(host), _dummy_files(root), vms_dir, crash, stubborn)
    elif name == "firecracker-double":
        from tests.support.firecracker_double import SWAGGER, launcher

        if not SWAGGER.exists():
            pytest.fail(f"Firecracker's swagger file is missing: {SWAGGER}")
        binary = str(launcher(root))
        kit = Kit(
            name,
            # The double is Python: on a loaded machine it may take seconds to listen.
            lambda: FirecrackerVMM(binary, run_dir, kvm_usable=False, start_timeout=60),
            _dummy_files(root),
            vms_dir,
            _kill_process,
            lambda: _stubborn_double(root),
        )
    elif name == "firecracker-jailed":
        from tests.support import jailer_double
        from tests.support.firecracker_double import SWAGGER, launcher

        if os.geteuid() != 0:
            pytest.skip("the jailer chroots and changes uid: it needs root")
        if not SWAGGER.exists():
            pytest.fail(f"Firecracker's swagger file is missing: {SWAGGER}")
        binary = str(launcher(root))
        jailer_bin = str(jailer_double.launcher(root))
        jails = root / "jails"
        jails.mkdir(mode=0o700)

        os.umask(PRIVATE_UMASK)  # hatchd's (restored by the fixture)

        def jailed() -> VMM:
            jailer = Jailer(jailer_bin, binary, jails, JAIL_UIDS)
            return FirecrackerVMM(
                binary, run_dir, kvm_usable=False, start_timeout=60, jailer=jailer
            )

        kit = Kit(
            name,
            jailed,
            _dummy_files(root),
            vms_dir,
            _kill_process,
            lambda: _stubborn_double(root),
        )
    elif name == "qemu":
        from hatchvm.vmm.accel import detect_accel
        from hatchvm.vmm.qemu import QemuVMM

        files = _image_files()
        accel = await detect_accel("qemu-system-x86_64", "auto")
        kit = Kit(
            name,
            lambda: QemuVMM("qemu-system-x86_64", accel, run_dir),
            files,
            vms_dir,
            _kill_process,
            None,  # a real guest obeys; only an unbooted one ignores the power button
            real_guest=True,
        )
    else:
        binary = os.environ.get("HATCH_FIRECRACKER_BIN") or shutil.which("firecracker")
        if binary is None:
            pytest.skip("no Firecracker binary here (set HATCH_FIRECRACKER_BIN on a KVM host)")
        if (problem := await _kvm_problem()) is not None:
            pytest.skip(f"KVM does not run guests here ({problem}): Firecracker cannot")
        files = _image_files()
        # HATCH_FIRECRACKER_JAILER set too: the real Firecracker under the real jailer.
        jailer_bin = os.environ.get("HATCH_FIRECRACKER_JAILER")
        jails = root / "jails"
        jails.mkdir(mode=0o700)

        def real() -> VMM:
            jailer = Jailer(jailer_bin, binary, jails, JAIL_UIDS) if jailer_bin else None
            return FirecrackerVMM(binary, run_dir, kvm_usable=True, jailer=jailer)

        kit = Kit(
            name,
            real,
            files,
            vms_dir,
            _kill_process,
            None,
            real_guest=True,
        )
    try:
        yield kit
    finally:
        await _cleanup(kit)


async def _cleanup(kit: Kit) -> None:
    """No VMM process outlives its test."""
    vmm = kit.make()
    for vm_id in await vmm.processes(kit.vms_dir):
        await vmm.kill(vm_id, kit.vms_dir / vm_id)
    if isinstance(vmm, FakeVMM):
        for vm_id in list(vmm.host.processes):
            await vmm.kill(vm_id, kit.vms_dir / vm_id)


@pytest.fixture
def vm_id() -> str:
    return new_id("vm")
