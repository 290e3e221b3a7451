"""What the host shows of a VM: its QEMU processes and its links."""

from __future__ import annotations

import subprocess


def qemu_pids(vm_id: str) -> list[int]:
    out = subprocess.run(["pgrep", "-f", f"hatch-{vm_id}"], capture_output=True, text=True)
    return [int(p) for p in out.stdout.split()]


def link_exists(name: str) -> bool:
    # Not /sys/class/net: sysfs still shows the namespace it was mounted in, not ours.
    return subprocess.run(["ip", "link", "show", "dev", name], capture_output=True).returncode == 0
