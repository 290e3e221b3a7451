"""Which driver hatchd builds (daemon._build_vmm): `auto` takes Firecracker only where KVM runs
guests and its binary is installed; an explicit HATCH_VMM=firecracker starts without usable
KVM (a warning), but not without its binary."""

from __future__ import annotations

import os
import shutil
import stat
from pathlib import Path

import pytest

from hatchvm import daemon
from hatchvm.config import load_settings
from hatchvm.vmm.firecracker import FirecrackerVMM
from hatchvm.vmm.qemu import QemuVMM


@pytest.fixture
def binary(tmp_path: Path) -> str:
    path = tmp_path / "firecracker"
    path.write_text("#!/bin/sh\n")
    path.chmod(0o755)
    return str(path)


def _settings(tmp_path: Path, **values: str) -> object:
    return load_settings(run_dir=tmp_path / "run", cgroups="off", **values)


def _kvm(monkeypatch: pytest.MonkeyPatch, works: bool) -> None:
    async def accel(_qemu: str, wanted: str) -> str:
        return "kvm" if works and wanted != "tcg" else "tcg"

    async def problem(_settings: object) -> str | None:
        return None if works else "a probe guest did not run within 3.0s under kvm"

    monkeypatch.setattr(daemon, "detect_accel", accel)
    monkeypatch.setattr(daemon, "_kvm_problem", problem)


async def test_auto_takes_firecracker_where_kvm_works(tmp_path, monkeypatch, binary) -> None:
    _kvm(monkeypatch, works=True)
    vmm, accel = await daemon._build_vmm(_settings(tmp_path, firecracker_bin=binary))
    assert isinstance(vmm, FirecrackerVMM) and accel == "kvm"


async def test_auto_never_takes_firecracker_without_kvm(tmp_path, monkeypatch, binary) -> None:
    _kvm(monkeypatch, works=False)
    vmm, accel = await daemon._build_vmm(_settings(tmp_path, firecracker_bin=binary))
    assert isinstance(vmm, QemuVMM) and accel == "tcg"


async def test_auto_takes_qemu_without_a_firecracker_binary(tmp_path, monkeypatch) -> None:
    _kvm(monkeypatch, works=True)
    settings = _settings(tmp_path, firecracker_bin=str(tmp_path / "none"))
    vmm, _ = await daemon._build_vmm(settings)
    assert isinstance(vmm, QemuVMM)


async def test_explicit_firecracker_starts_without_kvm(tmp_path, monkeypatch, binary) -> None:
    _kvm(monkeypatch, works=False)
    settings = _settings(tmp_path, vmm="firecracker", firecracker_bin=binary)
    vmm, accel = await daemon._build_vmm(settings)
    assert isinstance(vmm, FirecrackerVMM) and accel == "none"
    assert (await vmm.capabilities()).accel == "none"


async def test_explicit_firecracker_needs_its_binary(tmp_path, monkeypatch) -> None:
    _kvm(monkeypatch, works=True)
    settings = _settings(tmp_path, vmm="firecracker", firecracker_bin=str(tmp_path / "none"))
    with pytest.raises(daemon.StartupError, match=r"HATCH_VMM=firecracker but .* is not found"):
        await daemon._build_vmm(settings)


# ---- the jailer: everything it needs is checked at start-up -----------------------------


def _jailed(tmp_path: Path, binary: str, **values: str) -> object:
    data = tmp_path / "data"
    data.mkdir(exist_ok=True)
    values.setdefault("firecracker_jailer", binary)
    return _settings(
        tmp_path, vmm="firecracker", firecracker_bin=binary, data_dir=str(data), **values
    )


@pytest.mark.skipif(os.geteuid() != 0, reason="the jailer needs root")
async def test_a_usable_jailer_is_given_to_the_firecracker_driver(
    tmp_path, monkeypatch, binary
) -> None:
    _kvm(monkeypatch, works=False)
    vmm, _ = await daemon._build_vmm(_jailed(tmp_path, binary, firecracker_uid_base="910200"))
    assert isinstance(vmm, FirecrackerVMM) and vmm.jailer is not None
    assert vmm.jailer.chroot_base == tmp_path / "data" / "jailer"
    assert stat.S_IMODE((tmp_path / "data" / "jailer").stat().st_mode) == 0o700
    assert vmm.jailer.uids.base == 910200 and vmm.jailer.exec_name == "firecracker"


@pytest.mark.parametrize(
    ("values", "message"),
    [
        (
            {"firecracker_jailer": "/no/such/jailer"},
            "HATCH_FIRECRACKER_JAILER=/no/such/jailer is not an executable file",
        ),
        ({"firecracker_jailer": "{not executable}"}, "is not an executable file"),
        (
            {"firecracker_uid_base": "65534", "firecracker_uid_count": "1"},
            "uid 65534 of HATCH_FIRECRACKER_UID_BASE/_COUNT (65534-65534) belongs to user",
        ),
        (
            {"firecracker_chroot_base": "/dev/shm/hatchvm-jail-test"},
            "is not on the filesystem of the data dir",
        ),
    ],
)
@pytest.mark.skipif(os.geteuid() != 0, reason="the jailer needs root")
async def test_a_jailer_that_cannot_work_stops_the_start_naming_the_setting(
    tmp_path, monkeypatch, binary, values, message
) -> None:
    _kvm(monkeypatch, works=False)
    if "firecracker_chroot_base" in values and _same_fs("/dev/shm", tmp_path):
        pytest.skip("/dev/shm is on the same filesystem as the test's data dir here")
    if values.get("firecracker_jailer") == "{not executable}":
        plain = tmp_path / "jailer"
        plain.write_text("#!/bin/sh\n")
        plain.chmod(0o644)
        values = {"firecracker_jailer": str(plain)}
    try:
        with pytest.raises(daemon.StartupError) as err:
            await daemon._build_vmm(_jailed(tmp_path, binary, **values))
        assert message in str(err.value)
    finally:
        shutil.rmtree("/dev/shm/hatchvm-jail-test", ignore_errors=True)


def _same_fs(a: str, b: Path) -> bool:
    return os.stat(a).st_dev == os.stat(b).st_dev
