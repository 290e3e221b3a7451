"""Test session set-up: build the guest image (network needed), then leave the machine's own
network namespace for a fresh one, so every bridge, TAP and VM of the suite stays inside it."""

from __future__ import annotations

import os
import shutil
from collections.abc import Iterator

import pytest

from tests.support.netns import enter_fresh_netns, in_initial_netns

_VM_SKIP_REASON: str | None = None


def _vm_prerequisites() -> str | None:
    if os.geteuid() != 0:
        return "VM tests need root (bridges, TAPs, nftables)"
    for tool in ("qemu-system-x86_64", "nft", "ip", "mkfs.ext4"):
        if shutil.which(tool) is None:
            return f"{tool} is not installed (run scripts/setup)"
    if os.environ.get("HATCH_TEST_VMM") == "firecracker":
        return _firecracker_prerequisites()
    return None


def _firecracker_prerequisites() -> str | None:
    """HATCH_TEST_VMM=firecracker runs the VM tests on a real Firecracker: it needs the binary
    and a host where KVM really runs guests."""
    import asyncio

    from hatchvm.vmm.accel import probe

    binary = os.environ.get("HATCH_FIRECRACKER_BIN", "firecracker")
    if shutil.which(binary) is None:
        return f"HATCH_TEST_VMM=firecracker but {binary} is not found (set HATCH_FIRECRACKER_BIN)"
    if not os.access("/dev/kvm", os.R_OK | os.W_OK):
        return "HATCH_TEST_VMM=firecracker but /dev/kvm is missing or not accessible"
    if (problem := asyncio.run(probe("qemu-system-x86_64", "kvm"))) is not None:
        return f"HATCH_TEST_VMM=firecracker but KVM does not run guests here: {problem}"
    return None


def pytest_configure(config: pytest.Config) -> None:
    global _VM_SKIP_REASON
    _VM_SKIP_REASON = _vm_prerequisites()
    if _VM_SKIP_REASON is None and os.environ.get("HATCH_TEST_SKIP_IMAGE") != "1":
        try:
            from tests.support.image import ensure_test_image

            ensure_test_image()
        except Exception as exc:  # a build failure must show, but unit tests can still run
            _VM_SKIP_REASON = f"default image could not be built: {exc}"
    if os.geteuid() == 0 and in_initial_netns():
        enter_fresh_netns()


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    if _VM_SKIP_REASON is None:
        return
    skip = pytest.mark.skip(reason=_VM_SKIP_REASON)
    for item in items:
        if "vm" in item.keywords:
            item.add_marker(skip)


@pytest.fixture
def daemon_factory() -> Iterator[object]:
    from tests.support.daemon import HatchDaemon

    made: list[HatchDaemon] = []

    def make(**env: str) -> HatchDaemon:
        d = HatchDaemon(**env)
        made.append(d)
        return d

    yield make
    for d in made:
        d.cleanup()
