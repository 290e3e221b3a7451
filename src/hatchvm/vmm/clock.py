"""The host's TSC rate, which an emulated (TCG) guest needs on its kernel command line."""

from __future__ import annotations

import contextlib
import ctypes
import functools
import mmap
import platform
import time
from pathlib import Path


@functools.cache
def host_tsc_khz() -> int | None:
    """The host's TSC rate in kHz, measured with rdtsc against CLOCK_MONOTONIC_RAW.

    Under TCG the guest's TSC runs at the host's rate. The guest kernel calibrates it against
    the PIT with a tight timing loop, which fails when the host is busy (several VMs booting
    at once); the kernel then marks the TSC unstable and hangs at "Calibrating delay loop".
    Telling it the rate (tsc_early_khz=) skips that calibration."""
    if platform.machine() not in ("x86_64", "AMD64"):
        return None
    try:
        code = bytes.fromhex("0f3148c1e2204809d0c3")  # rdtsc; shl rdx,32; or rax,rdx; ret
        prot = mmap.PROT_READ | mmap.PROT_WRITE | mmap.PROT_EXEC
        buf = mmap.mmap(-1, mmap.PAGESIZE, prot=prot)
    except (OSError, ValueError):
        return _cpuinfo_khz()
    try:
        buf.write(code)
        func = ctypes.CFUNCTYPE(ctypes.c_uint64)(ctypes.addressof(ctypes.c_char.from_buffer(buf)))
        samples = []
        for _ in range(3):
            t0, c0 = time.clock_gettime_ns(time.CLOCK_MONOTONIC_RAW), func()
            time.sleep(0.05)
            t1, c1 = time.clock_gettime_ns(time.CLOCK_MONOTONIC_RAW), func()
            samples.append((c1 - c0) * 1_000_000 // (t1 - t0))
        del func
        khz = sorted(samples)[1]
    finally:
        with contextlib.suppress(BufferError):
            buf.close()
    return khz if 100_000 < khz < 10_000_000 else _cpuinfo_khz()


def _cpuinfo_khz() -> int | None:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("cpu MHz"):
                return int(float(line.split(":")[1]) * 1000)
    except (OSError, ValueError):
        pass
    return None
