"""Benchmark: POST /vms until the guest answers HTTP, against a raw QEMU boot of the same image
with the same flags, measured in the same run; plus hatchd's resident memory per running VM.

Run as root: `.venv/bin/python bench/create.py [--rounds N]`. It enters a fresh network
namespace of its own, so its bridge, TAPs and VMs vanish with it.
"""

from __future__ import annotations

import argparse
import asyncio
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.answers import first_answer
from hatchvm.images.disk import create_vm_disk
from hatchvm.net import links
from hatchvm.vmm.accel import detect_accel
from hatchvm.vmm.base import BootSpec
from hatchvm.vmm.qemu import QemuVMM
from tests.support.daemon import HatchDaemon
from tests.support.image import ensure_test_image
from tests.support.netns import enter_fresh_netns, in_initial_netns

WEB = "#!/bin/sh\nmkdir -p /w && echo ok > /w/index.html && busybox httpd -p 8080 -h /w\n"
MEM_MIB = 256


def raw_qemu_boot(vmm: QemuVMM, artifacts, work: Path, ip: str, tap: str) -> float:
    """Launch QEMU directly (same flags hatchd uses), time to the first HTTP answer."""
    vm_dir = work / "raw"
    shutil.rmtree(vm_dir, ignore_errors=True)
    vm_dir.mkdir(parents=True)
    create_vm_disk(vm_dir / "disk.ext4", 1024, "raw", WEB)
    links.ensure_tap(tap, "hbench0")
    spec = BootSpec(
        vm_id="vm_rawbaseline",
        vm_dir=vm_dir,
        kernel=artifacts.kernel,
        initrd=artifacts.initrd,
        rootfs=artifacts.rootfs,
        disk=vm_dir / "disk.ext4",
        vcpu_count=1,
        mem_mib=MEM_MIB,
        cmdline=f"{artifacts.boot_args} hatch.hostname=raw hatch.ip={ip}/24 "
        f"hatch.gw=172.30.0.1 hatch.dns=1.1.1.1",
        tap_name=tap,
        guest_mac="02:00:00:00:00:99",
    )
    # The driver's command in the foreground: this process owns QEMU here.
    vmm.sockets(vm_dir).mkdir(parents=True, exist_ok=True)
    cmd = vmm.foreground_command(spec, vm_dir / "console.log")
    t0 = time.monotonic()
    proc = subprocess.Popen(
        cmd, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
    )
    try:
        return first_answer(f"http://{ip}:8080/", poll=0.02) - t0
    finally:
        proc.kill()
        proc.wait()
        links.delete_link(tap)


def hatchd_boot(api: httpx.Client) -> tuple[float, str]:
    t0 = time.monotonic()
    r = api.post("/vms", json={"mem_mib": MEM_MIB, "user_data": WEB})
    r.raise_for_status()
    vm = r.json()
    return first_answer(f"http://{vm['guest_ip']}:8080/", poll=0.02) - t0, vm["id"]


def rss_kib(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    return 0


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args()
    artifacts = ensure_test_image()
    if in_initial_netns():
        enter_fresh_netns()
    links.ensure_bridge("hbench0", "172.30.0.1/24")
    work = Path(tempfile.mkdtemp(prefix="hvb-"))
    accel = asyncio.run(detect_accel("qemu-system-x86_64", "auto"))
    vmm = QemuVMM("qemu-system-x86_64", accel, work / "run")

    daemon = HatchDaemon(HATCH_MAX_VMS_PER_USER="50", HATCH_LOG_LEVEL="warning")
    daemon.start()
    key = daemon.create_key("bench")
    raw: list[float] = []
    hatch: list[float] = []
    try:
        with httpx.Client(
            base_url=daemon.url, timeout=180, headers={"Authorization": f"Bearer {key}"}
        ) as api:
            idle_rss = rss_kib(daemon.proc.pid)
            for i in range(args.rounds):  # interleaved, so drift hits both alike
                raw.append(raw_qemu_boot(vmm, artifacts, work, "172.30.0.200", "hvbraw0"))
                seconds, _vm_id = hatchd_boot(api)
                hatch.append(seconds)
                print(
                    f"round {i + 1}: raw qemu {raw[-1]:.2f}s  hatchd {hatch[-1]:.2f}s", flush=True
                )
            running = len(api.get("/vms").json())
            busy_rss = rss_kib(daemon.proc.pid)
    finally:
        daemon.cleanup()
        shutil.rmtree(work, ignore_errors=True)
        links.delete_link("hbench0")
    raw_med, hatch_med = statistics.median(raw), statistics.median(hatch)
    print()
    print(
        f"create -> guest answers HTTP (median of {args.rounds}, {MEM_MIB} MiB, accel={vmm.accel})"
    )
    print(f"  raw qemu boot  {raw_med:7.2f} s")
    print(f"  hatchd create  {hatch_med:7.2f} s")
    print(
        f"  ratio          {hatch_med / raw_med:7.3f}  (overhead {hatch_med / raw_med - 1:+.1%},"
        f" goal < +10%)"
    )
    per_vm = (busy_rss - idle_rss) / max(running, 1)
    print(
        f"hatchd RSS: idle {idle_rss / 1024:.1f} MiB, with {running} running VMs "
        f"{busy_rss / 1024:.1f} MiB -> {per_vm:.0f} KiB per VM"
    )


if __name__ == "__main__":
    main()
