"""One high CPU weight for every side of a benchmark, so the machine's other load does not decide
the figure.

On a busy host a guest boot under TCG gets whatever share of a CPU the scheduler leaves it, and
that share swings from round to round with everybody else's work (0.3 to 0.6 of a CPU measured
on a shared 2-core machine), far more than what is being measured. Here a raw QEMU runs in a
cgroup of its own and hatchd's VMs under their parent group, both at the highest weight, so each
gets a whole CPU as on an idle host. Neither loses a limit: hatchd's per-VM quota still applies
inside its parent; the raw QEMU has none, as before.
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
        self._raw: Path | None = None

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

    def raw_launcher(self) -> list[str]:
        """argv prefix that runs a command in the raw side's group: top weight, no quota."""
        if self._raw is None:
            self._raw = self._cpu_root() / f"hatchvm-bench-{os.getpid()}"
            self._raw.mkdir(exist_ok=True)
            self._raise(self._raw)
        return ["/bin/sh", "-c", 'echo $$ > "$0" && exec "$@"', str(self._raw / "cgroup.procs")]

    def close(self) -> None:
        if self._raw is not None:
            with contextlib.suppress(OSError):
                self._raw.rmdir()
