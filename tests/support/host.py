"""What the host shows of a VM: its QEMU processes, its links and its neighbour entry."""

from __future__ import annotations

import json
import subprocess


def qemu_pids(vm_id: str) -> list[int]:
    """The VM's VMM processes: QEMU (named hatch-<id>) or Firecracker (its API socket)."""
    pattern = f"hatch-{vm_id}|/{vm_id}/api.sock"
    out = subprocess.run(["pgrep", "-f", pattern], capture_output=True, text=True)
    return [int(p) for p in out.stdout.split()]


def link_exists(name: str) -> bool:
    # Not /sys/class/net: sysfs still shows the namespace it was mounted in, not ours.
    return subprocess.run(["ip", "link", "show", "dev", name], capture_output=True).returncode == 0


def link_info(name: str) -> dict:
    """`ip -j link show` of one link, as seen from our namespace."""
    out = subprocess.run(
        ["ip", "-j", "link", "show", "dev", name], capture_output=True, text=True, check=True
    )
    return json.loads(out.stdout)[0]


def pinned_addresses(bridge: str) -> set[str]:
    """The guest addresses with a permanent neighbour entry on the bridge."""
    out = subprocess.run(
        ["ip", "-4", "neigh", "show", "dev", bridge, "nud", "permanent"],
        capture_output=True,
        text=True,
    ).stdout
    return {line.split()[0] for line in out.splitlines() if line.strip()}


def asleep(vm_id: str, tap: str) -> bool:
    """Nothing of a snapshotted VM runs: no VMM process, or only its wake standby (one QEMU
    waiting for its state, core/standbys.py) whose TAP is down, so that nothing passes."""
    pids = qemu_pids(vm_id)
    if not pids:
        return True
    return len(pids) == 1 and link_exists(tap) and "UP" not in link_info(tap)["flags"]
