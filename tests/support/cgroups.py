"""What the host's cgroups show of a process, and removal of a test's cgroups."""

from __future__ import annotations

import contextlib
from pathlib import Path

from hatchvm.vmm.cgroups import CgroupError, VMCgroups, find_layout


def host_cgroups(parent: str) -> VMCgroups | None:
    layout = find_layout(Path("/proc/self/mountinfo").read_text())
    return VMCgroups(layout, parent) if layout is not None else None


def cgroup_of(pid: int, cgroups: VMCgroups, tid: int | None = None) -> list[str]:
    """The process's (or one of its threads') cgroup under each of the layout's controllers."""
    where = f"/proc/{pid}/task/{tid}/cgroup" if tid is not None else f"/proc/{pid}/cgroup"
    paths = []
    for line in Path(where).read_text().splitlines():
        _n, controllers, path = line.split(":", 2)
        names = set(controllers.split(","))
        if cgroups.layout.version == 2 and controllers == "":
            paths.append(path)
        elif cgroups.layout.version == 1 and names & {"memory", "cpu"}:
            paths.append(path)
    return paths


def threads_of(pid: int) -> list[int]:
    return sorted(int(t.name) for t in Path(f"/proc/{pid}/task").iterdir())


def remove_parent(cgroups: VMCgroups) -> None:
    """Remove every group under the parent (killing what runs there), then the parent."""
    for name in cgroups.groups():
        with contextlib.suppress(CgroupError):
            cgroups.remove(name)
    for root in cgroups.layout.roots:
        with contextlib.suppress(OSError):
            (root / cgroups.parent).rmdir()
