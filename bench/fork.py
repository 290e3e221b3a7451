"""Benchmark: forks against cold boots and a hot restore, and what a child costs in memory.

In one run, on one parent (256 MiB, a web server, a tmpfs filled with 100 MiB; about 220 MiB
of its memory touched in all, page cache included):
  one child of the running parent (paused while its memory is copied), one child of the parent
  asleep and one hot restore of the parent (snapshotted and restored from its own files), each
  until it answers HTTP, interleaved over --rounds rounds (medians): the goal is one child of
  the running parent within 1.5x a hot restore; the parent's wake after the fork of it asleep,
  that child alive (its memory file linked by the child: hatchd first gives the parent a copy
  of its own, in the background) against the hot restore; the steps of both from hatchd's log (the
  parent paused, its memory and disk copied meanwhile; the child's files, network, its VMM
  started, waiting for the parent's capture to end ("frozen"), its state loaded and resumed
  ("restore"), re-made by its agent, its NIC plugged in);
  time until N = 1, 4 and 8 children of the running parent all answer HTTP (POST
  /vms/{id}/fork, then each child's port 8080), against N VMs created at once (cold boots)
  until they all answer;
  host memory per child: the proportional set size (PSS) of each child's QEMU while the
  children only read, against the memory the parent's guest has touched (its memory file's
  allocated blocks): the goal is at most 10%.

Run as root: `.venv/bin/python bench/fork.py`. It enters a fresh network namespace of its
own, so its bridge, TAPs and VMs vanish with it.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path
from typing import Any

import httpx

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.answers import first_answer, standby_ready, stored
from hatchvm.core.vms import MEM_NAME
from hatchvm.vmm.process import processes_with_arg
from tests.support.daemon import HatchDaemon
from tests.support.image import ensure_test_image
from tests.support.netns import enter_fresh_netns, in_initial_netns

MEM_MIB = 256
TOUCH_MIB = 100
MiB = 1 << 20

# A web server; then the guest fills a tmpfs with TOUCH_MIB of its own files' bytes (what a
# guest's memory holds) and says "filled".
WORKLOAD = f"""#!/bin/sh
mkdir -p /w /fill && echo ok > /w/index.html
mount -t tmpfs -o size={TOUCH_MIB + 16}m tmpfs /fill
busybox httpd -p 8080 -h /w
i=0
while [ $(du -sm /fill | cut -f1) -lt {TOUCH_MIB} ]; do
  i=$((i + 1))
  for f in /bin/* /sbin/* /etc/* /lib/modules/*/modules.*; do
    [ -f "$f" ] && {{ echo "copy $i of $f"; cat "$f"; }} >> /fill/blob.$i
  done
done
echo filled > /w/filled
"""
COLD = "#!/bin/sh\nmkdir -p /w && echo ok > /w/index.html && busybox httpd -p 8080 -h /w\n"


def all_answer(vms: list[dict[str, Any]], path: str = "/") -> float:
    """The moment the last of the VMs answered."""
    return max(
        first_answer(f"http://{vm['guest_ip']}:8080{path}", timeout=300, request_timeout=60)
        for vm in vms
    )


def memory_kib(pid: int, mem_file: Path) -> dict[str, int]:
    """The process's PSS in all (QEMU itself and, under TCG, its translation cache included),
    and the PSS and private pages of its mapping of the guest's memory file."""
    out = {"total": 0, "ram_pss": 0, "ram_private": 0}
    current = ""
    for line in Path(f"/proc/{pid}/smaps").read_text().splitlines():
        fields = line.split()
        if not fields[0].endswith(":"):  # a mapping's header: address range ... path
            current = fields[5] if len(fields) > 5 else ""
            continue
        if fields[0] == "Pss:":
            out["total"] += int(fields[1])
            if current == str(mem_file):
                out["ram_pss"] += int(fields[1])
        elif fields[0] in ("Private_Clean:", "Private_Dirty:") and current == str(mem_file):
            out["ram_private"] += int(fields[1])
    return out


def qemu_pids(daemon: HatchDaemon) -> dict[str, int]:
    vms = daemon.data_dir / "vms"
    return {
        pidfile.parent.name: pid
        for pid, pidfile in processes_with_arg(b"-pidfile")
        if pidfile.parent.parent == vms
    }


def own_copy(mem: Path, timeout: float = 30) -> bool:
    """Until a forked sleeping parent's memory file is its own again (hatchd copies it in the
    background: SnapshotService.own_copy_later); False if that never came (a hatchd without
    it: its wake makes the copy)."""
    deadline = time.monotonic() + timeout
    while mem.stat().st_nlink > 1:
        if time.monotonic() > deadline:
            return False
        time.sleep(0.01)
    return True


def records(log: Path, event: str) -> list[dict[str, Any]]:
    """hatchd's log lines for event, in order."""
    found = []
    for line in log.read_text(errors="replace").splitlines():
        try:
            record = json.loads(line)
        except ValueError:
            continue
        if record.get("event") == event:
            found.append(record)
    return found


def steps(found: list[dict[str, Any]]) -> dict[str, float]:
    """The median of each step (its *_ms fields) over hatchd's log records of one event."""
    laps: dict[str, list[float]] = {}
    for record in found:
        for name, value in record.items():
            if name.endswith("_ms") and isinstance(value, int | float):
                laps.setdefault(name[:-3], []).append(float(value))
    return {name: statistics.median(values) for name, values in laps.items()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--counts", default="1,4,8")
    parser.add_argument("--rounds", type=int, default=5, help="of the one-child timings")
    args = parser.parse_args()
    counts = [int(n) for n in args.counts.split(",")]
    ensure_test_image()
    if in_initial_netns():
        enter_fresh_netns()
    most = max(counts)
    daemon = HatchDaemon(
        HATCH_LOG_LEVEL="info",  # the steps' times (see steps)
        HATCH_MAX_VMS_PER_USER=str(2 * most + 2),
        HATCH_MAX_VCPUS_PER_USER=str(2 * most + 2),
        HATCH_MAX_MEM_MIB_PER_USER=str((2 * most + 2) * MEM_MIB),
        HATCH_MAX_DISK_MIB_PER_USER=str((2 * most + 2) * 1024),
        HATCH_MAX_SNAPSHOTS_PER_VM=str(2 * args.rounds + 1),  # two per round are kept
    )
    daemon.start()
    key = daemon.create_key("bench")
    rows: list[tuple[int, float, float]] = []
    try:
        with httpx.Client(
            base_url=daemon.url, timeout=600, headers={"Authorization": f"Bearer {key}"}
        ) as api:
            parent = api.post("/vms", json={"mem_mib": MEM_MIB, "user_data": WORKLOAD})
            parent_vm = parent.raise_for_status().json()
            pid = parent_vm["id"]
            all_answer([parent_vm], "/filled")
            touched = (daemon.data_dir / "vms" / pid / MEM_NAME).stat().st_blocks * 512
            print(f"parent {pid}: {touched / MiB:.0f} MiB of its memory touched", flush=True)

            # One child of the running parent, one of the parent asleep and a hot restore,
            # interleaved round by round: a load that drifts during the run (these machines
            # are noisy) weighs on all three alike.
            hot: list[float] = []
            asleep: list[float] = []  # a child of the snapshotted parent: nothing to capture
            running: list[float] = []  # pauses the parent while it is captured
            after_fork: list[float] = []  # the parent's wake, its child still alive
            copied: list[bool] = []  # whether hatchd had given it its own copy first
            for _ in range(args.rounds):
                # Stored first: a restore while a snapshot is still being stored resumes on a
                # copy of its files, which is not the case measured here.
                stored(api, api.post(f"/vms/{pid}/snapshot").raise_for_status().json())
                standby_ready(api)
                t0 = time.monotonic()
                api.post(f"/vms/{pid}/restore").raise_for_status()
                hot.append(all_answer([parent_vm]) - t0)

                stored(api, api.post(f"/vms/{pid}/snapshot").raise_for_status().json())
                standby_ready(api)
                t0 = time.monotonic()
                child = api.post(f"/vms/{pid}/fork").raise_for_status().json()[0]
                asleep.append(all_answer([child]) - t0)
                # The parent wakes while its child still links its memory file.
                own = own_copy(daemon.data_dir / "vms" / pid / MEM_NAME)
                copied.append(own)
                if own:
                    standby_ready(api)
                t0 = time.monotonic()
                api.post(f"/vms/{pid}/restore").raise_for_status()
                after_fork.append(all_answer([parent_vm]) - t0)
                api.delete(f"/vms/{child['id']}").raise_for_status()

                t0 = time.monotonic()
                child = api.post(f"/vms/{pid}/fork").raise_for_status().json()[0]
                running.append(all_answer([child]) - t0)
                api.delete(f"/vms/{child['id']}").raise_for_status()
            hot_s, asleep_s, one_s = map(statistics.median, (hot, asleep, running))
            print(
                f"median of {args.rounds} rounds: hot restore {hot_s * 1000:.0f} ms, a child of "
                f"the parent asleep {asleep_s * 1000:.0f} ms, of the running parent "
                f"{one_s * 1000:.0f} ms",
                flush=True,
            )
            # A median hides a round that stalls (a child's first answer that waited a second
            # for TCP to send it again was found only in the rounds themselves).
            for name, values in (("hot restore", hot), ("child of the running parent", running)):
                ms = ", ".join(f"{v * 1000:.0f}" for v in values)
                print(f"  {name}: slowest {max(values) * 1000:.0f} ms; every round: {ms}")

            per_child: dict[str, float] = {}
            for n in counts:
                t0 = time.monotonic()
                response = api.post(f"/vms/{pid}/fork", json={"count": n})
                children = response.raise_for_status().json()
                fork_s = all_answer(children) - t0
                if n == most:
                    pids = qemu_pids(daemon)
                    for child in children:  # they only read: each serves a few requests
                        all_answer([child])
                    mems = [
                        memory_kib(pids[c["id"]], daemon.data_dir / "vms" / c["id"] / MEM_NAME)
                        for c in children
                    ]
                    per_child = {k: statistics.mean(m[k] for m in mems) * 1024 for k in mems[0]}
                for child in children:
                    api.delete(f"/vms/{child['id']}").raise_for_status()

                t0 = time.monotonic()
                cold = [
                    api.post("/vms", json={"mem_mib": MEM_MIB, "user_data": COLD})
                    .raise_for_status()
                    .json()
                    for _ in range(n)
                ]
                cold_s = all_answer(cold) - t0
                for vm in cold:
                    api.delete(f"/vms/{vm['id']}").raise_for_status()
                rows.append((n, fork_s, cold_s))
                print(
                    f"N={n}: forks answer in {fork_s:.2f} s, cold boots in {cold_s:.2f} s",
                    flush=True,
                )
        captures = records(daemon.log_path, "vm captured for a fork")
        captured = steps(captures)
        # The running parent's captures, one per round (the N forks come after them).
        copies = [float(r.get("memory_ms", 0)) for r in captures[: args.rounds]]
        child_steps = steps(records(daemon.log_path, "fork child running"))
    finally:
        daemon.cleanup()
    print()
    for title, laps in (("parent paused", captured), ("child started", child_steps)):
        print(f"{title} (median ms): " + ", ".join(f"{k} {v:.0f}" for k, v in laps.items()))
    print(f"hot restore of the parent -> answer: {hot_s:.2f} s")
    print(f"{'N':>3} {'forks':>8} {'cold boots':>11} {'ratio':>6}")
    for n, fork_s, cold_s in rows:
        print(f"{n:>3} {fork_s:>7.2f}s {cold_s:>10.2f}s {fork_s / cold_s:>6.2f}")
    print(f"one child of the running parent / hot restore: {one_s / hot_s:.2f} (goal <= 1.5)")
    # The child waits for the copy of its parent's memory, whose time on a host that must
    # first back fresh pages (a VM whose hypervisor took back freed memory) swings round by round.
    pairs = ", ".join(f"{c * 1000:.0f} ({m:.0f})" for c, m in zip(running, copies, strict=False))
    print(f"  every round, child ms (the parent's memory copy ms): {pairs}")
    print(f"one child of the snapshotted parent / hot restore: {asleep_s / hot_s:.2f}")
    after_s = statistics.median(after_fork)
    print(
        f"the parent's wake, its child of it asleep still alive: {after_s * 1000:.0f} ms "
        f"({after_s / hot_s:.2f}x a hot restore; its own copy made first in "
        f"{sum(copied)} of {len(copied)} rounds)"
    )
    ram, private = per_child["ram_pss"], per_child["ram_private"]
    print(f"memory per child (N={most}), the parent having touched {touched / MiB:.0f} MiB:")
    print(
        f"  guest RAM PSS {ram / MiB:.1f} MiB ({ram / touched:.1%}; goal <= 10%), of which "
        f"private {private / MiB:.1f} MiB ({private / touched:.1%}): the rest is the frozen "
        f"image's pages, shared by the {most} children"
    )
    print(
        f"  whole QEMU process PSS {per_child['total'] / MiB:.1f} MiB (TCG's translation "
        "cache and QEMU's own memory included)"
    )


if __name__ == "__main__":
    main()
