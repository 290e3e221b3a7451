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


def _read_int(path: Path) -> int:
    return int(path.read_text().split()[0])


def _group(cgroups: VMCgroups, vm_id: str, controller: str) -> Path:
    roots = cgroups.layout.roots
    root = roots[0] if controller == "memory" or len(roots) == 1 else roots[1]
    return root / cgroups.parent / vm_id


def limits_of(cgroups: VMCgroups, vm_id: str) -> tuple[int, int, int]:
    """The VM's group's memory limit (bytes), CPU quota and period (microseconds)."""
    mem, cpu = _group(cgroups, vm_id, "memory"), _group(cgroups, vm_id, "cpu")
    if cgroups.layout.version == 2:
        quota, period = (mem / "cpu.max").read_text().split()
        return _read_int(mem / "memory.max"), int(quota), int(period)
    return (
        _read_int(mem / "memory.limit_in_bytes"),
        _read_int(cpu / "cpu.cfs_quota_us"),
        _read_int(cpu / "cpu.cfs_period_us"),
    )


def set_cpu_quota(cgroups: VMCgroups, vm_id: str, quota_us: int) -> None:
    """The VM's group may use quota_us of CPU time per period from now on."""
    cpu = _group(cgroups, vm_id, "cpu")
    if cgroups.layout.version == 2:
        period = (cpu / "cpu.max").read_text().split()[1]
        (cpu / "cpu.max").write_text(f"{quota_us} {period}")
    else:
        (cpu / "cpu.cfs_quota_us").write_text(str(quota_us))


def memory_of(cgroups: VMCgroups, vm_id: str) -> tuple[int, int, int]:
    """The VM's group's memory use now, its peak (bytes), and how often the OOM killer ran."""
    mem = _group(cgroups, vm_id, "memory")
    if cgroups.layout.version == 2:
        usage, peak, events = mem / "memory.current", mem / "memory.peak", mem / "memory.events"
    else:
        usage, peak = mem / "memory.usage_in_bytes", mem / "memory.max_usage_in_bytes"
        events = mem / "memory.oom_control"
    counts = dict(line.split() for line in events.read_text().splitlines())
    return _read_int(usage), _read_int(peak), int(counts.get("oom_kill", 0))
