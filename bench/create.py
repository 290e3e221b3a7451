"""Benchmark: POST /vms until the guest answers HTTP, against a raw QEMU boot of the same image
with the same command line, measured in the same run; plus hatchd's resident memory with a VM
running.

The raw side is the command hatchd's QEMU driver builds (vmm.foreground_command), guest RAM in
a memory file on the same filesystem as hatchd's VMs included: that file is what makes a
snapshot a matter of milliseconds, and it costs a TCG boot about 10% over anonymous RAM. A
third, informative side boots the same with anonymous RAM, so that price stays in view.

Rounds alternate their order (raw, anonymous, hatchd; then the reverse) and each ends with
its VM gone (the raw QEMU killed, hatchd's VM deleted), so no round runs beside an earlier
round's guest. Every side runs at the top CPU weight (bench/cpu_priority.py; --no-priority to
leave the scheduler alone), so other work on the machine does not decide the figure. The
figure is the median of the per-round ratios hatchd / raw (goal: under 1.10).

A fourth side creates the same VM through a second hatchd with warm templates on, once the
template of that shape is built (its first create boots cold and is not timed): create until
the guest answers from a template, against the same raw boot (goal: at most 0.2x).

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
from dataclasses import dataclass
from pathlib import Path

import httpx

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.answers import first_answer
from bench.cpu_priority import CpuPriority
from hatchvm.images.builder import ImageArtifacts
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
RAW_IP, RAW_MAC, RAW_TAP, RAW_BRIDGE = "172.30.0.200", "02:00:00:00:00:99", "hvbraw0", "hbench0"


class RawQemu:
    """QEMU launched by hand with the driver's own command line, timed to the first answer."""

    def __init__(self, vmm: QemuVMM, artifacts: ImageArtifacts, work: Path, launcher: list[str]):
        self.vmm, self.artifacts, self.work, self.launcher = vmm, artifacts, work, launcher

    def boot(self, memory_file: bool) -> float:
        vm_dir = self.work / "raw"
        shutil.rmtree(vm_dir, ignore_errors=True)
        vm_dir.mkdir(parents=True)
        create_vm_disk(vm_dir / "disk.ext4", 1024, "raw", WEB)
        links.ensure_tap(RAW_TAP, RAW_BRIDGE)
        # As hatchd does for its guests: no ARP, so the first answer is seen the moment it
        # can be (an unanswered ARP request delays the next try by up to a second).
        links.pin_neighbour(RAW_BRIDGE, RAW_IP, RAW_MAC)
        spec = BootSpec(
            vm_id="vm_rawbaseline",
            vm_dir=vm_dir,
            kernel=self.artifacts.kernel,
            initrd=self.artifacts.initrd,
            rootfs=self.artifacts.rootfs,
            disk=vm_dir / "disk.ext4",
            vcpu_count=1,
            mem_mib=MEM_MIB,
            cmdline=f"{self.artifacts.boot_args} hatch.hostname=raw hatch.ip={RAW_IP}/24 "
            f"hatch.gw=172.30.0.1 hatch.dns=1.1.1.1",
            tap_name=RAW_TAP,
            guest_mac=RAW_MAC,
            mem_file=vm_dir / "mem" if memory_file else None,
        )
        # The driver's command in the foreground: this process owns QEMU here.
        self.vmm.sockets(vm_dir).mkdir(parents=True, exist_ok=True)
        cmd = self.launcher + self.vmm.foreground_command(spec, vm_dir / "console.log")
        t0 = time.monotonic()
        proc = subprocess.Popen(
            cmd, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
        )
        try:
            return first_answer(f"http://{RAW_IP}:8080/", poll=0.02) - t0
        finally:
            proc.kill()
            proc.wait()
            links.delete_link(RAW_TAP)


@dataclass(frozen=True)
class Created:
    seconds: float  # to the guest's first answer
    post: float  # POST /vms: it returns once the guest runs (a QEMU's start-up included)
    throttled_ms: float | None  # the VM's CPU quota held it back this long (None: unknown)
    rss_kib: int  # hatchd's, with the VM running


def hatchd_boot(api: httpx.Client, daemon: HatchDaemon, priority: CpuPriority) -> Created:
    """Create a VM, time it to the first HTTP answer, note what else is worth knowing, then
    delete it."""
    t0 = time.monotonic()
    r = api.post("/vms", json={"mem_mib": MEM_MIB, "user_data": WEB})
    r.raise_for_status()
    created = time.monotonic() - t0
    vm = r.json()
    seconds = first_answer(f"http://{vm['guest_ip']}:8080/", poll=0.02) - t0
    throttled = priority.throttled_ms(daemon.cgroup_parent, vm["id"])
    assert daemon.proc is not None
    rss = rss_kib(daemon.proc.pid)
    api.delete(f"/vms/{vm['id']}").raise_for_status()  # gone before the next round starts
    return Created(seconds, created, throttled, rss)


def wait_template(daemon: HatchDaemon, timeout: float = 300) -> None:
    """Until the daemon's templates directory holds a finished template."""
    deadline = time.monotonic() + timeout
    while not list((daemon.data_dir / "templates").glob("*/shape.json")):
        if time.monotonic() > deadline:
            raise SystemExit(f"no template was built within {timeout:g} s:\n{daemon.log_tail()}")
        time.sleep(0.2)


def rss_kib(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    return 0


def median_ratio(top: list[float], bottom: list[float]) -> float:
    return statistics.median(t / b for t, b in zip(top, bottom, strict=True))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument(
        "--no-priority", action="store_true", help="leave every side at its usual CPU weight"
    )
    args = parser.parse_args()
    artifacts = ensure_test_image()
    if in_initial_netns():
        enter_fresh_netns()
    links.ensure_bridge(RAW_BRIDGE, "172.30.0.1/24")
    work = Path(tempfile.mkdtemp(prefix="hvb-"))
    accel = asyncio.run(detect_accel("qemu-system-x86_64", "auto"))
    vmm = QemuVMM("qemu-system-x86_64", accel, work / "run")
    priority = CpuPriority()
    prioritised = priority.available and not args.no_priority

    daemon = HatchDaemon(HATCH_MAX_VMS_PER_USER="50", HATCH_LOG_LEVEL="warning")
    warm = HatchDaemon(
        HATCH_MAX_VMS_PER_USER="50", HATCH_LOG_LEVEL="warning", HATCH_TEMPLATES="true"
    )
    for each in (daemon, warm):
        each.start()
        assert each.proc is not None
        if prioritised:
            priority.raise_parent(each.cgroup_parent)  # made by hatchd at start-up
            priority.raise_process(each.proc.pid)
    assert daemon.proc is not None
    raw = RawQemu(vmm, artifacts, work, priority.raw_launcher() if prioritised else [])
    key = daemon.create_key("bench")
    warm_key = warm.create_key("bench")
    warm_api = httpx.Client(
        base_url=warm.url, timeout=180, headers={"Authorization": f"Bearer {warm_key}"}
    )
    times: dict[str, list[float]] = {"raw": [], "anonymous": [], "hatchd": [], "template": []}
    posts: list[float] = []
    throttled: list[float] = []
    busy_rss = 0
    try:
        hatchd_boot(warm_api, warm, priority)  # its shape's first create: boots, then a template
        wait_template(warm)
        with httpx.Client(
            base_url=daemon.url, timeout=180, headers={"Authorization": f"Bearer {key}"}
        ) as api:
            idle_rss = rss_kib(daemon.proc.pid)
            for i in range(args.rounds):
                # Interleaved, in turn forwards and backwards: drift hits every side alike.
                order = ["raw", "anonymous", "hatchd", "template"]
                for side in order if i % 2 == 0 else order[::-1]:
                    if side == "template":
                        seconds = hatchd_boot(warm_api, warm, priority).seconds
                    elif side == "hatchd":
                        made = hatchd_boot(api, daemon, priority)
                        seconds = made.seconds
                        posts.append(made.post)
                        if made.throttled_ms is not None:
                            throttled.append(made.throttled_ms)
                        busy_rss = max(busy_rss, made.rss_kib)
                    else:
                        seconds = raw.boot(memory_file=side == "raw")
                    times[side].append(seconds)
                print(
                    f"round {i + 1}: raw qemu {times['raw'][-1]:.2f}s  "
                    f"(anonymous RAM {times['anonymous'][-1]:.2f}s)  "
                    f"hatchd {times['hatchd'][-1]:.2f}s  "
                    f"ratio {times['hatchd'][-1] / times['raw'][-1]:.3f}  "
                    f"template {times['template'][-1]:.2f}s  "
                    f"ratio {times['template'][-1] / times['raw'][-1]:.3f}",
                    flush=True,
                )
    finally:
        warm_api.close()
        warm.cleanup()
        daemon.cleanup()
        priority.close()
        shutil.rmtree(work, ignore_errors=True)
        links.delete_link(RAW_BRIDGE)
    ratio = median_ratio(times["hatchd"], times["raw"])
    memory_file = median_ratio(times["raw"], times["anonymous"])
    from_template = median_ratio(times["template"], times["raw"])
    print()
    print(
        f"create -> guest answers HTTP ({args.rounds} rounds, {MEM_MIB} MiB, accel={vmm.accel}, "
        f"cpu priority {'on' if prioritised else 'off'})"
    )
    print(f"  raw qemu boot           median {statistics.median(times['raw']):6.2f} s")
    print(f"  hatchd create           median {statistics.median(times['hatchd']):6.2f} s")
    print(f"    of which POST /vms    median {statistics.median(posts):6.2f} s  (guest runs)")
    print(f"  ratio hatchd / raw      median {ratio:6.3f}  ({ratio - 1:+.1%}, goal < +10%)")
    print(f"  hatchd from a template  median {statistics.median(times['template']):6.2f} s")
    print(f"  ratio template / raw    median {from_template:6.3f}  (goal <= 0.2)")
    if throttled:
        print(
            f"  hatchd's CPU quota held a booting guest back {statistics.median(throttled):.0f} ms"
            f" (median; at most {max(throttled):.0f} ms)"
        )
    print(
        f"  raw, anonymous RAM      median {statistics.median(times['anonymous']):6.2f} s"
        f"  (the memory file costs {memory_file - 1:+.1%})"
    )
    print(
        f"hatchd RSS: idle {idle_rss / 1024:.1f} MiB, with a VM running {busy_rss / 1024:.1f} MiB"
        f" -> {busy_rss - idle_rss} KiB per VM"
    )


if __name__ == "__main__":
    main()
