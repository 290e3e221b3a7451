"""Which driver hatchd builds (daemon._build_vmm): `auto` takes Firecracker only where KVM runs
guests and its binary is installed; an explicit HATCH_VMM=firecracker starts without usable
KVM (a warning), but not without its binary."""

from __future__ import annotations

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
