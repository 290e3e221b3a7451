"""The default guest image boots under QEMU (TCG), runs user_data at every boot, keeps its SSH
host keys across reboots and powers off cleanly on an ACPI power button (QMP system_powerdown).

The image is built once (or reused) in HATCH_TEST_IMAGE_DIR, default
~/.cache/hatchvm/test-image-v<BUILDER_VERSION>; building needs the Debian package mirror."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import socket
import subprocess
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from hatchvm.images.builder import ImageArtifacts, load_artifacts
from hatchvm.images.disk import create_vm_disk
from hatchvm.vmm.base import BootSpec
from hatchvm.vmm.qemu import QemuVMM

pytestmark = [
    pytest.mark.vm,
    pytest.mark.skipif(os.geteuid() != 0, reason="booting the guest image needs root"),
    pytest.mark.skipif(
        shutil.which("qemu-system-x86_64") is None, reason="qemu-system-x86_64 is not installed"
    ),
]

READY = "hatchvm: guest ready"
BOOT_TIMEOUT = 120.0  # TCG on a busy CI machine; a quiet one boots in about 5 s
POWEROFF_TIMEOUT = 30.0


@pytest.fixture(scope="module")
def image() -> ImageArtifacts:
    from tests.support.image import ensure_test_image

    return ensure_test_image()


class Guest:
    """One QEMU microvm, started with the platform driver's command line (no NIC)."""

    def __init__(self, workdir: Path, image: ImageArtifacts, disk: Path, append: str) -> None:
        self.console = workdir / "console.log"
        self.console.unlink(missing_ok=True)
        # A short directory for the sockets: Unix socket paths are limited to 108 bytes.
        self.run_dir = Path(tempfile.mkdtemp(prefix="hvi-", dir="/tmp"))
        vmm = QemuVMM("qemu-system-x86_64", "tcg", self.run_dir)
        vmm.sockets(workdir).mkdir(parents=True)
        self.qmp_path = vmm.sockets(workdir) / "qmp.sock"
        spec = BootSpec(
            vm_id="vm_imagetest",
            vm_dir=workdir,
            kernel=image.kernel,
            initrd=image.initrd,
            rootfs=image.rootfs,
            disk=disk,
            vcpu_count=1,
            mem_mib=256,
            cmdline=f"{image.boot_args} {append}",
        )
        # The driver's own command, run in the foreground so the test owns the process.
        cmd = vmm.foreground_command(spec, self.console)
        self.stderr = (workdir / "qemu.stderr").open("wb")
        self.started = time.monotonic()
        self.proc = subprocess.Popen(
            cmd, stdin=subprocess.DEVNULL, stdout=self.stderr, stderr=self.stderr
        )

    def text(self) -> str:
        try:
            return self.console.read_text(errors="replace")
        except FileNotFoundError:
            return ""

    def wait_console(self, needle: str, timeout: float = BOOT_TIMEOUT) -> float:
        """Seconds since start when `needle` showed up on the console."""
        deadline = self.started + timeout
        while time.monotonic() < deadline:
            if needle in self.text():
                return time.monotonic() - self.started
            if self.proc.poll() is not None:
                break
            time.sleep(0.05)
        raise AssertionError(
            f"{needle!r} not on the console after {timeout}s "
            f"(qemu exit {self.proc.poll()}); console:\n{self.text()[-3000:]}"
        )

    def qmp(self, command: str) -> dict[str, object]:
        with socket.socket(socket.AF_UNIX) as sock:
            sock.settimeout(10)
            sock.connect(str(self.qmp_path))
            stream = sock.makefile("rw")

            def call(name: str) -> dict[str, object]:
                stream.write(json.dumps({"execute": name}) + "\n")
                stream.flush()
                while True:  # skip asynchronous events
                    reply: dict[str, object] = json.loads(stream.readline())
                    if "return" in reply or "error" in reply:
                        return reply

            json.loads(stream.readline())  # greeting
            call("qmp_capabilities")
            return call(command)

    def kill(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(10)
        self.stderr.close()
        shutil.rmtree(self.run_dir, ignore_errors=True)


@pytest.fixture
def boot(tmp_path: Path, image: ImageArtifacts) -> Iterator[object]:
    guests: list[Guest] = []

    def start(disk: Path, append: str = "hatch.hostname=vm-test") -> Guest:
        guest = Guest(tmp_path, image, disk, append)
        guests.append(guest)
        return guest

    yield start
    for guest in guests:
        guest.kill()


def debugfs_cat(disk: Path, path: str) -> str:
    return subprocess.run(
        ["debugfs", "-R", f"cat {path}", str(disk)], capture_output=True, check=True
    ).stdout.decode(errors="replace")


def fs_state(disk: Path) -> str:
    out = subprocess.run(
        ["dumpe2fs", "-h", str(disk)], capture_output=True, text=True, check=True
    ).stdout
    return next(line.split(":", 1)[1].strip() for line in out.splitlines() if "state:" in line)


def power_off(guest: Guest) -> float:
    """system_powerdown, then the seconds until QEMU exits by itself."""
    t0 = time.monotonic()
    assert guest.qmp("system_powerdown") == {"return": {}}
    try:
        code = guest.proc.wait(POWEROFF_TIMEOUT)
    except subprocess.TimeoutExpired:
        raise AssertionError(
            f"QEMU still running {POWEROFF_TIMEOUT}s after system_powerdown; console:\n"
            f"{guest.text()[-3000:]}"
        ) from None
    assert code == 0, guest.text()[-3000:]
    return time.monotonic() - t0


def test_artifacts_match_the_manifest(image: ImageArtifacts) -> None:
    assert image.vmlinux.read_bytes()[:4] == b"\x7fELF"
    assert image.kernel.read_bytes()[0x202:0x206] == b"HdrS"  # a bzImage
    assert image.initrd.read_bytes()[:2] == b"\x1f\x8b"
    assert "console=ttyS0" in image.boot_args and "hatch." not in image.boot_args
    manifest = json.loads((image.kernel.parent / "manifest.json").read_text())
    assert manifest["kernel_version"] == image.kernel_version
    for info in manifest["files"].values():
        data = (image.kernel.parent / info["file"]).read_bytes()
        assert len(data) == info["size"]
        assert hashlib.sha256(data).hexdigest() == info["sha256"]
    assert load_artifacts(image.kernel.parent) == image


def test_incomplete_image_dir_is_not_loaded(image: ImageArtifacts, tmp_path: Path) -> None:
    copy = tmp_path / "img"
    shutil.copytree(image.kernel.parent, copy, copy_function=os.link)
    assert load_artifacts(copy) is not None
    (copy / "initrd.img").unlink()
    (copy / "initrd.img").write_bytes(b"truncated")
    assert load_artifacts(copy) is None
    assert load_artifacts(tmp_path / "missing") is None


def test_boot_user_data_reboot_and_powerdown(boot: object, tmp_path: Path) -> None:
    disk = tmp_path / "disk.ext4"
    create_vm_disk(
        disk,
        128,
        "vm-test",
        '#!/bin/sh\necho "user-data says hi from $(hostname) uid=$(id -u)"\ndate >> /root/boots\n',
    )

    guest = boot(disk)  # type: ignore[operator]
    ready = guest.wait_console(READY)
    guest.wait_console("user-data says hi from vm-test uid=0")
    guest.wait_console("hatchvm: user-data exited with status 0")
    print(f"first boot: ready after {ready:.1f}s")
    took = power_off(guest)
    print(f"first boot: powered off in {took:.1f}s")
    assert fs_state(disk) == "clean"
    keys = debugfs_cat(disk, "/upper/etc/dropbear/dropbear_ed25519_host_key")
    assert keys, "no SSH host key generated on first boot"
    guest.kill()

    # Second boot: user_data runs again, the host key stays, the hostname comes from the disk.
    guest = boot(disk, append="")  # type: ignore[operator]
    ready = guest.wait_console(READY)
    guest.wait_console("hatchvm: user-data exited with status 0")
    print(f"second boot: ready after {ready:.1f}s")
    assert "user-data says hi from vm-test uid=0" in guest.text()
    power_off(guest)
    assert fs_state(disk) == "clean"
    assert debugfs_cat(disk, "/upper/etc/dropbear/dropbear_ed25519_host_key") == keys
    assert len(debugfs_cat(disk, "/upper/root/boots").splitlines()) == 2
    log = debugfs_cat(disk, "/upper/var/log/user-data.log")
    assert log.count("user-data says hi from vm-test") == 2


def test_boot_without_user_data(boot: object, tmp_path: Path) -> None:
    disk = tmp_path / "disk.ext4"
    create_vm_disk(disk, 64, "vm-plain", None)
    guest = boot(disk, append="hatch.hostname=vm-plain")  # type: ignore[operator]
    guest.wait_console(READY)
    assert "running user-data" not in guest.text()
    assert "fatal" not in guest.text()
    power_off(guest)
    assert fs_state(disk) == "clean"
