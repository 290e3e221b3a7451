"""Benchmark: the host memory a QEMU guest really takes, against the memory limit hatchd gives
its cgroup (vmm/overhead.py). Guests of 256 MiB and 1 GiB boot under TCG, with hatchd's
translation cache (HATCH_QEMU_TB_SIZE_MIB) and with QEMU's own default (1 GiB), each in a
cgroup of its own without a limit (so nothing is capped); each fills tmpfs with most of its
RAM. Printed per guest, once booted and once filled: the cgroup's usage and peak, QEMU's
anonymous memory, the TCG code generated so far, and the limit hatchd would set.

Run as root: `.venv/bin/python bench/footprint.py`. It enters a fresh network namespace of its
own; it needs no network (the guests have no NIC).
"""

from __future__ import annotations

import argparse
import asyncio
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from hatchvm.core.console import Consoles
from hatchvm.images.disk import create_vm_disk
from hatchvm.vmm.base import BootSpec
from hatchvm.vmm.cgroups import VMCgroups, find_layout
from hatchvm.vmm.qemu import QMP_SOCKET, QemuVMM
from hatchvm.vmm.qmp import qmp_execute
from tests.support.cgroups import memory_of, remove_parent
from tests.support.image import ensure_test_image
from tests.support.netns import enter_fresh_netns, in_initial_netns

FILL = """#!/bin/sh
echo "bench booted" > /dev/console
mkdir -p /mnt/fill && mount -t tmpfs -o size={mib}m tmpfs /mnt/fill
dd if=/dev/zero of=/mnt/fill/x bs=1M count={mib} 2>/dev/null
echo "bench filled" > /dev/console
"""
MIB = 1 << 20


class Unlimited(QemuVMM):
    """hatchd's QEMU command and cgroup, with the memory limit lifted: measure, do not cap."""

    def memory_footprint_mib(self, mem_mib: int) -> int:
        return 4 * mem_mib + 4096


def rss_anon_mib(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("RssAnon:"):
            return int(line.split()[1]) // 1024
    return 0


async def jit_mib(vmm: QemuVMM, vm_dir: Path) -> int:
    out = await qmp_execute(
        vmm.sockets(vm_dir) / QMP_SOCKET, "human-monitor-command", {"command-line": "info jit"}
    )
    for line in out.splitlines():
        if line.startswith("gen code size"):
            return int(line.split()[3].split("/")[0]) // MIB
    return 0


async def wait_console(console: Path, text: str, timeout: float = 300) -> None:
    deadline = time.monotonic() + timeout
    while text not in console.read_text(errors="replace"):
        if time.monotonic() > deadline:
            raise TimeoutError(f"{text!r} not on {console}")
        await asyncio.sleep(0.1)


async def measure(cgroups: VMCgroups, work: Path, mem_mib: int, tb_mib: int) -> None:
    artifacts = ensure_test_image()
    vm_id = f"vm_bench{mem_mib}x{tb_mib}"
    vm_dir = work / vm_id
    vm_dir.mkdir()
    fill = mem_mib - 96 - mem_mib // 8  # what the guest kernel lets tmpfs have without OOM
    create_vm_disk(vm_dir / "disk.ext4", 256, "bench", FILL.format(mib=fill))
    vmm = Unlimited("qemu-system-x86_64", "tcg", work / "run", tb_mib, cgroups)
    spec = BootSpec(
        vm_id=vm_id,
        vm_dir=vm_dir,
        kernel=artifacts.kernel,
        initrd=artifacts.initrd,
        rootfs=artifacts.rootfs,
        disk=vm_dir / "disk.ext4",
        vcpu_count=1,
        mem_mib=mem_mib,
        cmdline=f"{artifacts.boot_args} hatch.hostname=bench",
        mem_file=vm_dir / "mem",
    )
    limit = QemuVMM("qemu-system-x86_64", "tcg", work, 64).memory_footprint_mib(mem_mib)
    pid = await vmm.boot(spec)
    consoles = Consoles(16 << 20)  # hatchd's console recorder writes console.log
    await consoles.record(vm_id, vm_dir, vmm.console_socket(vm_dir))
    await vmm.resume(vm_id, vm_dir)
    try:
        for phase in ("booted", "filled"):
            await wait_console(vm_dir / "console.log", f"bench {phase}")
            usage, peak, _ooms = memory_of(cgroups, vm_id)
            print(
                f"{mem_mib} MiB guest, tb-size {tb_mib:4} MiB, {phase}"
                + (f" {fill} MiB" if phase == "filled" else "")
                + f": cgroup {usage // MIB} MiB (peak {peak // MIB}), QEMU anon "
                f"{rss_anon_mib(pid)} MiB, TCG code {await jit_mib(vmm, vm_dir)} MiB; "
                f"hatchd's limit {limit} MiB",
                flush=True,
            )
    finally:
        await vmm.kill(vm_id, vm_dir)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", default="256,1024", help="guest memory sizes (MiB)")
    parser.add_argument("--tb-sizes", default="64,1024", help="TCG cache sizes (MiB)")
    args = parser.parse_args()
    if os.geteuid() != 0:
        raise SystemExit("run as root: the guests get cgroups")
    layout = find_layout(Path("/proc/self/mountinfo").read_text())
    if layout is None:
        raise SystemExit("no memory and cpu cgroup controllers on this host")
    ensure_test_image()  # before the namespace: a first build downloads packages
    if in_initial_netns():
        enter_fresh_netns()
    cgroups = VMCgroups(layout, f"hatchvm-bench-{os.getpid()}")
    cgroups.prepare()
    work = Path(tempfile.mkdtemp(prefix="hvfp-", dir="/tmp"))
    try:
        for mem_mib in map(int, args.sizes.split(",")):
            for tb_mib in map(int, args.tb_sizes.split(",")):
                asyncio.run(measure(cgroups, work, mem_mib, tb_mib))
    finally:
        remove_parent(cgroups)
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
