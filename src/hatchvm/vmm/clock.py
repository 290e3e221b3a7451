"""The host's TSC rate, which an emulated (TCG) guest needs on its kernel command line.

Under TCG the guest's TSC runs at the host's rate. The guest kernel calibrates it against the
PIT with a tight timing loop, which fails when the host is busy (several VMs booting at once);
the kernel then marks the TSC unstable and hangs at "Calibrating delay loop". Telling it the
rate (tsc_early_khz=) skips that calibration.

The rate is read from the kernel, never measured by code of our own: the time conversion the
kernel publishes for user-space readers of perf events (perf_event_mmap_page's time_mult and
time_shift turn TSC cycles into nanoseconds) is exactly its TSC rate. Where perf events are
unavailable, /proc/cpuinfo's "cpu MHz" (the TSC rate on hosts without frequency scaling).
"""

from __future__ import annotations

import ctypes
import functools
import mmap
import os
import platform
import struct
from pathlib import Path

_SYS_PERF_EVENT_OPEN = 298  # x86_64
_PERF_TYPE_SOFTWARE = 1
_PERF_COUNT_SW_DUMMY = 9
_ATTR_SIZE = 128  # PERF_ATTR_SIZE_VER8: the kernel accepts any known size
_EXCLUDE_KERNEL_AND_HV = (1 << 5) | (1 << 6)
# perf_event_mmap_page: capabilities at 40 (bit 3: cap_user_time), time_shift (u16) at 50,
# time_mult (u32) at 52.
_CAPS = struct.Struct("<Q")
_TIME = struct.Struct("<HI")
_CAP_USER_TIME = 1 << 3


@functools.cache
def host_tsc_khz() -> int | None:
    """The host's TSC rate in kHz, or None when it cannot be known."""
    if platform.machine() not in ("x86_64", "AMD64"):
        return None
    khz = _perf_tsc_khz() or _cpuinfo_khz()
    return khz if khz and 100_000 < khz < 10_000_000 else None


def _perf_tsc_khz() -> int | None:
    """ns = cycles * time_mult >> time_shift, so kHz = 10^6 * 2^time_shift / time_mult."""
    attr = bytearray(_ATTR_SIZE)
    struct.pack_into("<IIQ", attr, 0, _PERF_TYPE_SOFTWARE, _ATTR_SIZE, _PERF_COUNT_SW_DUMMY)
    struct.pack_into("<Q", attr, 40, _EXCLUDE_KERNEL_AND_HV)
    libc = ctypes.CDLL(None, use_errno=True)
    buf = (ctypes.c_char * _ATTR_SIZE).from_buffer(attr)
    fd = libc.syscall(_SYS_PERF_EVENT_OPEN, buf, 0, -1, -1, 0)
    if fd < 0:
        return None
    try:
        with mmap.mmap(fd, mmap.PAGESIZE, mmap.MAP_SHARED, mmap.PROT_READ) as page:
            (caps,) = _CAPS.unpack_from(page, 40)
            shift, mult = _TIME.unpack_from(page, 50)
    except (OSError, ValueError):
        return None
    finally:
        os.close(fd)
    if not caps & _CAP_USER_TIME or not mult:
        return None  # the clock source is not the TSC: the kernel publishes no conversion
    return round(1_000_000 * (1 << shift) / mult)


def _cpuinfo_khz() -> int | None:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("cpu MHz"):
                return int(float(line.split(":")[1]) * 1000)
    except (OSError, ValueError):
        pass
    return None
