"""Soak: snapshot/wake cycles through the proxy while a counter in each guest's memory keeps
counting. Phase 1: one VM, --cycles cycles. Phase 2: --vms VMs cycling at once, --each cycles
each. Every wake must resume the same boot (boot_id), with the counter at least where it was
when the snapshot was taken and close behind it (nothing lost, nothing restarted). hatchd's
resident memory and open descriptors are sampled after every cycle of phase 1 and at the end:
they must stay flat from the first cycles to the last.

Run as root: `.venv/bin/python bench/soak.py [--cycles 200] [--vms 10] [--each 20]`. It enters
a fresh network namespace of its own.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

import httpx

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from tests.support.daemon import HatchDaemon
from tests.support.image import ensure_test_image
from tests.support.netns import enter_fresh_netns, in_initial_netns

# The counter is a shell variable (guest memory), published to a tmpfs ten times a second.
COUNTER = """#!/bin/sh
mkdir -p /run/www
cat /proc/sys/kernel/random/boot_id > /run/www/boot_id
busybox httpd -p 8080 -h /run/www
(
  i=0
  while :; do
    i=$((i + 1))
    echo $i > /run/www/count.new && mv /run/www/count.new /run/www/count
    sleep 0.1
  done
) >/dev/null 2>&1 &
"""
# A wake may answer only this far (0.1 s steps) past the snapshot's value: more would mean the
# guest ran on somewhere unseen; less than zero would mean it went back in time.
MAX_DRIFT = 50


@dataclass
class Tally:
    cycles: int = 0
    errors: list[str] = field(default_factory=list)
    cycle_seconds: list[float] = field(default_factory=list)
    lock: threading.Lock = field(default_factory=threading.Lock)

    def fail(self, what: str) -> None:
        with self.lock:
            self.errors.append(what)
        print(f"ERROR {what}", flush=True)


def resources(pid: int) -> tuple[int, int]:
    """hatchd's resident memory (KiB) and open descriptors."""
    rss = next(
        int(line.split()[1])
        for line in Path(f"/proc/{pid}/status").read_text().splitlines()
        if line.startswith("VmRSS:")
    )
    return rss, len(os.listdir(f"/proc/{pid}/fd"))


class Guest:
    def __init__(self, api: httpx.Client, daemon: HatchDaemon, name: str) -> None:
        self.api = api
        vm = api.post("/vms", json={"mem_mib": 256, "user_data": COUNTER}).raise_for_status()
        self.id = vm.json()["id"]
        self.direct = f"http://{vm.json()['guest_ip']}:8080"
        api.post(f"/vms/{self.id}/routes", json={"subdomain": name, "target_port": 8080})
        self.proxied = f"http://127.0.0.1:{daemon.proxy_port}"
        self.host = {"Host": f"{name}.hatch.local"}
        self.client = httpx.Client(timeout=120)
        self.boot_id = self._wait(f"{self.direct}/boot_id")
        self.previous_snapshot: str | None = None

    def _wait(self, url: str, headers: dict[str, str] | None = None) -> str:
        deadline = time.monotonic() + 180
        while time.monotonic() < deadline:
            try:
                answer = self.client.get(url, headers=headers)
                if answer.status_code == 200 and answer.text.strip():
                    return answer.text.strip()
            except httpx.TransportError:
                pass
            time.sleep(0.05)
        raise TimeoutError(url)

    def count(self) -> int:
        return int(self._wait(f"{self.proxied}/count", self.host))

    def cycle(self, tally: Tally) -> None:
        t0 = time.monotonic()
        before = self.count()
        snap = self.api.post(f"/vms/{self.id}/snapshot")
        if snap.status_code != 201:
            tally.fail(f"{self.id}: snapshot {snap.status_code} {snap.text}")
            return
        # The request through the proxy wakes it.
        after = self.count()
        boot = self._wait(f"{self.proxied}/boot_id", self.host)
        if boot != self.boot_id:
            tally.fail(f"{self.id}: rebooted instead of resumed ({boot} != {self.boot_id})")
        if not 0 <= after - before <= MAX_DRIFT:
            tally.fail(f"{self.id}: counter {before} before the snapshot, {after} after the wake")
        if self.previous_snapshot is not None:
            gone = self.api.delete(f"/snapshots/{self.previous_snapshot}")
            if gone.status_code != 200:
                tally.fail(f"{self.id}: delete snapshot {gone.status_code} {gone.text}")
        self.previous_snapshot = snap.json()["id"]
        with tally.lock:
            tally.cycles += 1
            tally.cycle_seconds.append(time.monotonic() - t0)


def report(name: str, tally: Tally) -> None:
    times = sorted(tally.cycle_seconds)
    print(
        f"{name}: {tally.cycles} cycles, {len(tally.errors)} errors, cycle median "
        f"{statistics.median(times):.2f} s, p90 {times[int(len(times) * 0.9) - 1]:.2f} s"
        if times
        else f"{name}: no cycle completed, {len(tally.errors)} errors"
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--cycles", type=int, default=200, help="phase 1: cycles of one VM")
    parser.add_argument("--vms", type=int, default=10, help="phase 2: VMs cycling at once")
    parser.add_argument("--each", type=int, default=20, help="phase 2: cycles of each VM")
    args = parser.parse_args()
    ensure_test_image()
    if in_initial_netns():
        enter_fresh_netns()
    daemon = HatchDaemon(
        HATCH_MAX_VMS_PER_USER=str(args.vms + 1),
        HATCH_MAX_MEM_MIB_PER_USER=str(256 * (args.vms + 1)),
        HATCH_MAX_VCPUS_PER_USER=str(args.vms + 1),
        HATCH_MAX_DISK_MIB_PER_USER=str(1024 * (args.vms + 1)),
        HATCH_LOG_LEVEL="warning",
    )
    daemon.start()
    assert daemon.proc is not None
    key = daemon.create_key("soak")
    samples: list[tuple[int, int]] = []  # after each cycle of phase 1
    during: list[tuple[int, int]] = []  # every 2 s of phase 2
    try:
        with httpx.Client(
            base_url=daemon.url, timeout=300, headers={"Authorization": f"Bearer {key}"}
        ) as api:
            one = Guest(api, daemon, "soak0")
            phase1 = Tally()
            for i in range(args.cycles):
                one.cycle(phase1)
                samples.append(resources(daemon.proc.pid))
                if (i + 1) % 20 == 0:
                    rss, fds = samples[-1]
                    print(f"cycle {i + 1}: hatchd {rss // 1024} MiB resident, {fds} fds")
            report("phase 1 (one VM)", phase1)

            guests = [Guest(api, daemon, f"soak{n + 1}") for n in range(args.vms)]
            phase2 = Tally()
            workers = [
                threading.Thread(target=lambda g=g: [g.cycle(phase2) for _ in range(args.each)])
                for g in guests
            ]
            for worker in workers:
                worker.start()
            while any(worker.is_alive() for worker in workers):  # sampled while they cycle
                during.append(resources(daemon.proc.pid))
                workers[0].join(2.0)
            for worker in workers:
                worker.join()
            report(f"phase 2 ({args.vms} VMs at once)", phase2)
    finally:
        daemon.cleanup()
    print()
    print("hatchd                    first 10%        last 10%   (medians)")
    for name, series in (("phase 1", samples), ("phase 2", during)):
        tenth = max(len(series) // 10, 1)
        first, last = series[:tenth], series[-tenth:]
        print(
            f"{name} resident     {statistics.median(s[0] for s in first) / 1024:8.1f} MiB"
            f"    {statistics.median(s[0] for s in last) / 1024:8.1f} MiB"
        )
        print(
            f"{name} descriptors  {statistics.median(s[1] for s in first):8.0f}"
            f"        {statistics.median(s[1] for s in last):8.0f}"
        )
    errors = phase1.errors + phase2.errors
    print(f"errors: {len(errors)}")
    sys.exit(1 if errors else 0)


if __name__ == "__main__":
    main()
