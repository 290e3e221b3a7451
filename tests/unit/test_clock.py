"""The host TSC rate comes from the kernel: no code of ours is ever made executable."""

from __future__ import annotations

import mmap
from pathlib import Path

import pytest

from hatchvm.vmm import clock


def writable_executable_maps() -> set[str]:
    maps = Path("/proc/self/maps").read_text().splitlines()
    return {line for line in maps if len(line.split()) > 1 and line.split()[1].startswith("rwx")}


def test_the_rate_is_read_from_the_kernel_not_measured(monkeypatch) -> None:
    protections: list[int] = []
    real_mmap = mmap.mmap

    def recording_mmap(*args, **kwargs):  # type: ignore[no-untyped-def]
        protections.append(kwargs.get("prot", args[3] if len(args) > 3 else 0))
        return real_mmap(*args, **kwargs)

    monkeypatch.setattr(mmap, "mmap", recording_mmap)
    before = writable_executable_maps()
    khz = clock.host_tsc_khz.__wrapped__()
    assert not any(p & mmap.PROT_EXEC for p in protections)
    assert writable_executable_maps() <= before
    if khz is None:
        pytest.skip("this host publishes no TSC rate (not x86_64, or no perf page nor cpuinfo)")
    assert 100_000 < khz < 10_000_000
    cpuinfo = clock._cpuinfo_khz()
    if cpuinfo is not None and clock._perf_tsc_khz() is not None:
        assert abs(khz - cpuinfo) / cpuinfo < 0.05  # two kernel views of one rate agree


def test_an_unusable_perf_page_falls_back_to_cpuinfo(monkeypatch) -> None:
    monkeypatch.setattr(clock, "_perf_tsc_khz", lambda: None)
    monkeypatch.setattr(clock, "_cpuinfo_khz", lambda: 2_400_000)
    assert clock.host_tsc_khz.__wrapped__() == 2_400_000
    monkeypatch.setattr(clock, "_cpuinfo_khz", lambda: 12)  # nonsense is not passed on
    assert clock.host_tsc_khz.__wrapped__() is None
