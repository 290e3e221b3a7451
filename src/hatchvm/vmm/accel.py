"""Which accelerator QEMU can really use. /dev/kvm can exist while guests hang under it, so
`auto` boots a tiny probe guest under KVM and falls back to TCG unless it runs."""

from __future__ import annotations

import asyncio
import os
import tempfile
from pathlib import Path
from typing import Literal

import structlog

from hatchvm.vmm.base import VMMError

log = structlog.get_logger("hatchvm.vmm")

PROBE_TIMEOUT = 3.0
# A 64 KiB firmware image (source: kvm_probe.S) that switches to long mode with paging, spins
# ~100M instructions and writes 3 to the isa-debug-exit port, so QEMU exits (3 << 1) | 1 = 7.
# A guest that only runs real-mode code is not enough: on hosts where KVM is broken, real mode
# works and guests hang at the switch to long mode. Anything but exit 7 in time means no KVM.
_PROBE_CODE = bytes.fromhex(
    "fa31c08ed82e660f0116b8000f20c06683c8010f22c066ea1e000f00080066b8"
    "10008ed88ec08ed0bf0010000031c0b9000c0000f3abc7050010000003200000"
    "c7050020000003300000c70500300000830000000f20e083c8200f22e0b80010"
    "00000f22d8b9800000c00f320d000100000f300f20c00d000000800f22c0ea85"
    "000f001800b980f0fa02ffc975fcb003e6f4f4ebfd0f1f000000000000000000"
    "ffff0000009acf00ffff00000092cf00ffff0000009aaf001f0098000f00"
)
_RESET_JUMP = bytes.fromhex("ea000000f0")  # at 0xffff0: ljmp 0xf000:0000, the code above
_PROBE_EXIT = 7
_cache: dict[str, str] = {}


def _probe_rom() -> bytes:
    rom = bytearray(b"\xf4" * 0x10000)  # hlt everywhere else
    rom[: len(_PROBE_CODE)] = _PROBE_CODE
    rom[0xFFF0 : 0xFFF0 + len(_RESET_JUMP)] = _RESET_JUMP
    return bytes(rom)


async def probe(qemu_bin: str, accel: str, timeout: float = PROBE_TIMEOUT) -> str | None:
    """None if a guest runs under accel, else the reason it does not."""
    with tempfile.TemporaryDirectory() as tmp:
        rom = Path(tmp) / "probe.bin"
        rom.write_bytes(_probe_rom())
        try:
            proc = await asyncio.create_subprocess_exec(
                qemu_bin,
                "-M",
                "microvm,x-option-roms=off,rtc=off,isa-serial=off",
                "-accel",
                accel,
                "-nodefaults",
                "-no-user-config",
                "-display",
                "none",
                "-m",
                "16",
                "-bios",
                str(rom),
                "-device",
                "isa-debug-exit,iobase=0xf4,iosize=0x04",
                stdin=asyncio.subprocess.DEVNULL,
                stdout=asyncio.subprocess.DEVNULL,
                stderr=asyncio.subprocess.PIPE,
            )
        except OSError as exc:
            return f"cannot run {qemu_bin}: {exc}"
        try:
            _, stderr = await asyncio.wait_for(proc.communicate(), timeout)
        except TimeoutError:
            proc.kill()
            await proc.wait()
            return f"a probe guest did not run within {timeout}s under {accel}"
    if proc.returncode != _PROBE_EXIT:
        return f"probe guest exited {proc.returncode}: {stderr.decode(errors='replace').strip()}"
    return None


async def detect_accel(qemu_bin: str, wanted: Literal["auto", "kvm", "tcg"]) -> str:
    if wanted == "tcg":
        return "tcg"
    if wanted == "kvm":
        if not os.path.exists("/dev/kvm"):
            raise VMMError("HATCH_QEMU_ACCEL=kvm but /dev/kvm does not exist")
        return "kvm"
    if qemu_bin in _cache:
        return _cache[qemu_bin]
    if not os.access("/dev/kvm", os.R_OK | os.W_OK):
        reason: str | None = "/dev/kvm is missing or not accessible"
    else:
        reason = await probe(qemu_bin, "kvm")
    accel = "kvm" if reason is None else "tcg"
    if reason is not None:
        log.warning("kvm unusable, falling back to tcg (software emulation)", reason=reason)
    _cache[qemu_bin] = accel
    return accel
