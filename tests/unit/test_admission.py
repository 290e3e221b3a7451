"""Host admission's arithmetic: committed memory, MemAvailable and free disk, each with its
reserve, and the disk space a VM's sparse files may still take."""

from __future__ import annotations

from pathlib import Path

from hatchvm.config import Settings
from hatchvm.core.admission import HostState, check, read_host, space_needed_mib
from hatchvm.errors import BackendUnavailable

SETTINGS = Settings(host_mem_reserve_mib=1000, host_disk_reserve_mib=500, data_dir="/srv/hatch")
ROOMY = HostState(mem_total_mib=8000, mem_available_mib=7000, disk_free_mib=10_000)


def refusal(host: HostState, committed: int = 0, mem: int = 400, disk: int = 1000) -> str | None:
    try:
        check(SETTINGS, host, committed, mem, disk)
    except BackendUnavailable as exc:
        assert exc.status == 503
        return exc.message
    return None


def test_a_vm_that_fits() -> None:
    assert refusal(ROOMY) is None


def test_committed_memory_counts_running_vms_in_full() -> None:
    # 8000 - 1000 reserved = 7000 for VMs: 6600 + 400 fits, 6601 + 400 does not.
    assert refusal(ROOMY, committed=6600) is None
    assert refusal(ROOMY, committed=6601) == (
        "not enough host memory: running VMs may use 6601 MiB and this one 400 MiB, "
        "VMs get 7000 MiB (1000 MiB kept for the host)"
    )


def test_available_memory_keeps_the_reserve() -> None:
    busy = HostState(mem_total_mib=8000, mem_available_mib=1400, disk_free_mib=10_000)
    assert refusal(busy, mem=400) is None
    assert refusal(busy, mem=401) == (
        "not enough host memory: this VM may use 401 MiB, the host has 1400 MiB available "
        "and keeps 1000 MiB"
    )


def test_free_disk_keeps_the_reserve() -> None:
    tight = HostState(mem_total_mib=8000, mem_available_mib=7000, disk_free_mib=1500)
    assert refusal(tight, disk=1000) is None
    assert refusal(tight, disk=1001) == (
        "not enough disk space in /srv/hatch: this VM needs 1001 MiB, 1500 MiB are free "
        "and 500 MiB kept free"
    )


def test_space_needed_is_what_sparse_files_do_not_hold_yet(tmp_path: Path) -> None:
    sparse, full = tmp_path / "sparse", tmp_path / "full"
    with sparse.open("wb") as f:
        f.truncate(64 << 20)
    full.write_bytes(b"\1" * (8 << 20))
    needed = space_needed_mib({sparse: 64, full: 16, tmp_path / "missing": 32})
    assert needed == 64 + (16 - 8) + 32


def test_read_host_sees_this_machine(tmp_path: Path) -> None:
    host = read_host(tmp_path)
    assert 0 < host.mem_available_mib <= host.mem_total_mib
    assert host.disk_free_mib > 0
