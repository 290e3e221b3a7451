"""One high CPU weight for every side of a benchmark, so the machine's other load does not decide
the figure.

On a busy host a guest boot under TCG gets whatever share of a CPU the scheduler leaves it, and
that share swings from round to round with everybody else's work (0.3 to 0.6 of a CPU measured
on a shared 2-core machine), far more than what is being measured. Here a raw QEMU runs in a
cgroup of its own, hatchd itself in another and hatchd's VMs under their parent group, all at the
highest weight, so each gets a whole CPU as on an idle host. Nobody loses a limit: hatchd's
per-VM quota still applies inside its parent; the raw QEMU and hatchd have none, as before.
"""

from __future__ import annotations

import contextlib
import os
from pathlib import Path

from hatchvm.vmm.cgroups import Layout, find_layout

V1_SHARES = "262144"  # cpu.shares' maximum
V2_WEIGHT = "10000"  # cpu.weight's maximum


class CpuPriority:
    def __init__(self) -> None:
        self.layout: Layout | None = find_layout(Path("/proc/self/mountinfo").read_text())
        self._groups: list[Path] = []

    @property
    def available(self) -> bool:
        return self.layout is not None

    def _cpu_root(self) -> Path:
        assert self.layout is not None
        return self.layout.roots[-1]  # v2: the unified tree; v1: the cpu hierarchy

    def _raise(self, group: Path) -> None:
        assert self.layout is not None
        if self.layout.version == 2:
            (group / "cpu.weight").write_text(V2_WEIGHT)
        else:
            (group / "cpu.shares").write_text(V1_SHARES)

    def raise_parent(self, parent: str) -> None:
        """hatchd's VMs: their parent group (made by hatchd at start-up) at the top weight."""
        self._raise(self._cpu_root() / parent)

    def _group(self, name: str) -> Path:
        """A group of the bench's own at the top weight, with no quota."""
        group = self._cpu_root() / f"hatchvm-bench-{os.getpid()}-{name}"
        group.mkdir(exist_ok=True)
        self._raise(group)
        self._groups.append(group)
        return group

    def throttled_ms(self, parent: str, group: str) -> float | None:
        """How long the CPU quota of hatchd's group `group` has held its tasks back."""
        if self.layout is None:
            return None
        try:
            text = (self._cpu_root() / parent / group / "cpu.stat").read_text()
        except OSError:
            return None
        stat = dict(line.split() for line in text.splitlines())
        if "throttled_usec" in stat:  # v2
            return int(stat["throttled_usec"]) / 1000
        return int(stat.get("throttled_time", 0)) / 1e6  # v1: nanoseconds

    def raw_launcher(self) -> list[str]:
        """argv prefix that runs a command in the raw side's group."""
        procs = self._group("raw") / "cgroup.procs"
        return ["/bin/sh", "-c", 'echo $$ > "$0" && exec "$@"', str(procs)]

    def raise_process(self, pid: int) -> None:
        """hatchd (every thread, and what it starts from now on) into a group of its own."""
        (self._group("hatchd") / "cgroup.procs").write_text(str(pid))

    def close(self) -> None:
        for group in self._groups:
            with contextlib.suppress(OSError):
                group.rmdir()
