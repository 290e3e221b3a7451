"""A cgroup per VM: the VM's QEMU and whatever it starts live in `<parent>/<vm_id>` under the
memory and cpu controllers (cgroup v2, or the separate hierarchies of v1), limited to the VM's
memory plus QEMU's overhead and to its vCPUs' worth of CPU time.

QEMU is placed in its group before it runs: it is launched through `sh`, which writes its own
pid into the group's cgroup.procs files and then execs QEMU. So every thread, the -daemonize
child and a migration's `cat` are born inside the group and charged to it from their first
page, and hatchd runs no Python between fork and exec (preexec_fn is unsafe in a threaded
program). Moving a running process in afterwards (adopt) is only for VMs started without one.
"""

from __future__ import annotations

import contextlib
import errno
import os
import signal
import time
from dataclasses import dataclass
from pathlib import Path

CPU_PERIOD_US = 100_000
_CONTROLLERS = ("memory", "cpu")
# Writes the shell's pid ($$) into each file named before "--", then becomes the command.
_ENTER = 'for f; do shift; [ "$f" = -- ] && break; echo $$ > "$f" || exit 125; done; exec "$@"'


class CgroupError(Exception):
    """A cgroup could not be made, limited, entered or removed; the message says which."""


@dataclass(frozen=True)
class Limits:
    memory_bytes: int
    vcpus: int  # CPU time: this many CPUs' worth per period, and a proportional weight


@dataclass(frozen=True)
class Layout:
    """Where the memory and cpu controllers are: one unified mount (v2), or v1's two."""

    version: int
    roots: tuple[Path, ...]  # v2: (unified,); v1: (memory, cpu)


def _unescape(field: str) -> str:
    """mountinfo escapes spaces and the like as octal (\\040)."""
    return field.encode().decode("unicode_escape")


def find_layout(mountinfo: str) -> Layout | None:
    """The usable layout described by /proc/self/mountinfo, v2 first; None without both
    controllers (on a hybrid host they are usually bound to v1)."""
    unified: Path | None = None
    v1: dict[str, Path] = {}
    for line in mountinfo.splitlines():
        mine, _, fs = line.partition(" - ")
        fields, fs_fields = mine.split(), fs.split()
        if len(fields) < 5 or len(fs_fields) < 3:
            continue
        mount = Path(_unescape(fields[4]))
        if fs_fields[0] == "cgroup2" and unified is None:
            unified = mount
        elif fs_fields[0] == "cgroup":
            for name in set(fs_fields[2].split(",")) & set(_CONTROLLERS):
                v1.setdefault(name, mount)
    if unified is not None:
        with contextlib.suppress(OSError):
            available = (unified / "cgroup.controllers").read_text().split()
            if set(_CONTROLLERS) <= set(available):
                return Layout(2, (unified,))
    if set(_CONTROLLERS) <= set(v1):
        return Layout(1, (v1["memory"], v1["cpu"]))
    return None


def _write(path: Path, value: str) -> None:
    try:
        path.write_text(value)
    except OSError as exc:
        raise CgroupError(f"cannot write {value!r} to {path}: {exc.strerror}") from None


class VMCgroups:
    def __init__(self, layout: Layout, parent: str) -> None:
        self.layout = layout
        self.parent = parent

    def describe(self) -> str:
        where = ", ".join(str(root / self.parent) for root in self.layout.roots)
        return f"cgroup v{self.layout.version} at {where}"

    def _dirs(self, vm_id: str) -> list[Path]:
        return [root / self.parent / vm_id for root in self.layout.roots]

    def procs_files(self, vm_id: str) -> list[Path]:
        return [d / "cgroup.procs" for d in self._dirs(vm_id)]

    # ---- set-up ------------------------------------------------------------------------

    def prepare(self) -> None:
        """Create the parent group (on v2 with memory and cpu enabled for its children): what
        fails here (not root, a read-only or undelegated tree) would fail every VM."""
        for root in self.layout.roots:
            path = root
            for part in self.parent.split("/"):
                self._enable_below(path)
                path = path / part
                try:
                    path.mkdir(exist_ok=True)
                except OSError as exc:
                    raise CgroupError(f"cannot create {path}: {exc.strerror}") from None
            self._enable_below(path)

    def _enable_below(self, path: Path) -> None:
        if self.layout.version != 2:
            return
        control = path / "cgroup.subtree_control"
        try:
            enabled = set(control.read_text().split())
        except OSError as exc:
            raise CgroupError(f"cannot read {control}: {exc.strerror}") from None
        missing = [c for c in _CONTROLLERS if c not in enabled]
        if missing:
            _write(control, " ".join(f"+{c}" for c in missing))

    # ---- one VM ------------------------------------------------------------------------

    def properties(self, limits: Limits) -> list[tuple[str, str]]:
        """The (file, value) pairs that set these limits on a VM's group: written by create(),
        or handed to Firecracker's jailer as its --cgroup options."""
        quota = limits.vcpus * CPU_PERIOD_US
        if self.layout.version == 2:
            return [
                ("memory.max", str(limits.memory_bytes)),
                ("cpu.max", f"{quota} {CPU_PERIOD_US}"),
                ("cpu.weight", str(min(100 * limits.vcpus, 10_000))),
            ]
        return [
            ("memory.limit_in_bytes", str(limits.memory_bytes)),
            ("cpu.cfs_period_us", str(CPU_PERIOD_US)),
            ("cpu.cfs_quota_us", str(quota)),
            ("cpu.shares", str(1024 * limits.vcpus)),
        ]

    def create(self, vm_id: str, limits: Limits) -> None:
        """The VM's group with these limits (an existing one gets them too)."""
        dirs = self._dirs(vm_id)
        for d in dirs:
            try:
                d.mkdir(exist_ok=True)
            except OSError as exc:
                raise CgroupError(f"cannot create {d}: {exc.strerror}") from None
        for name, value in self.properties(limits):
            # v1: the memory controller's hierarchy first, the cpu controller's second.
            d = dirs[-1] if name.startswith("cpu.") else dirs[0]
            _write(d / name, value)

    def launcher(self, vm_id: str) -> list[str]:
        """argv prefix that runs a command inside the VM's group (see the module's doc)."""
        return ["/bin/sh", "-c", _ENTER, "hatchvm-cgroup", *map(str, self.procs_files(vm_id)), "--"]

    def pids(self, vm_id: str) -> set[int]:
        """The processes in the VM's group (none when it does not exist)."""
        found: set[int] = set()
        for procs in self.procs_files(vm_id):
            found |= self._members(procs)
        return found

    def adopt(self, vm_id: str, pid: int, limits: Limits) -> bool:
        """Make sure a running VM's process is in its group with these limits; True if it had
        to be moved (memory it used before stays charged where it was)."""
        self.create(vm_id, limits)
        if all(pid in self._members(procs) for procs in self.procs_files(vm_id)):
            return False
        for procs in self.procs_files(vm_id):
            _write(procs, str(pid))  # moves every thread of the process
        return True

    @staticmethod
    def _members(procs: Path) -> set[int]:
        try:
            return {int(p) for p in procs.read_text().split()}
        except FileNotFoundError:
            return set()

    def remove(self, vm_id: str, timeout: float = 5.0) -> None:
        """Kill whatever is left in the VM's group and remove it. Idempotent."""
        deadline = time.monotonic() + timeout
        while True:
            for pid in self.pids(vm_id):
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, signal.SIGKILL)
            try:
                for d in self._dirs(vm_id):
                    with contextlib.suppress(FileNotFoundError):
                        d.rmdir()
                return
            except OSError as exc:
                # EBUSY while killed tasks are still being released.
                if exc.errno != errno.EBUSY or time.monotonic() >= deadline:
                    raise CgroupError(f"cannot remove cgroup of {vm_id}: {exc.strerror}") from None
            time.sleep(0.02)

    # ---- start-up ----------------------------------------------------------------------

    def groups(self) -> set[str]:
        names: set[str] = set()
        for root in self.layout.roots:
            with contextlib.suppress(FileNotFoundError):
                names |= {p.name for p in (root / self.parent).iterdir() if p.is_dir()}
        return names

    def sweep(self, keep: set[str]) -> tuple[list[str], list[str]]:
        """Remove the empty groups of VMs not in keep (left by VMs that died while no daemon
        watched). Returns (removed, left alone because processes still run in them)."""
        removed, busy = [], []
        for name in sorted(self.groups() - keep):
            if self.pids(name):
                busy.append(name)
                continue
            with contextlib.suppress(CgroupError):
                self.remove(name, timeout=1.0)
                removed.append(name)
        return removed, busy
