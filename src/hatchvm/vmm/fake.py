"""An in-memory VMM driver for tests: it keeps the driver contract (tests/contract/) without
processes, so core's wake, reaper, reconciliation and snapshot paths get fast unit tests.

VMs "run" on a FakeHost, shared by driver objects the way real VMM processes outlive hatchd: a
new FakeVMM on the same host (a restarted daemon) finds them. The host also plays what real
life does behind hatchd's back: `crash()` ends a VMM, `fail()` makes the next calls of an
operation fail, `stubborn` guests ignore a graceful stop. It writes real files where real
drivers do (the memory file, the state file) so core's file handling is exercised too.
"""

from __future__ import annotations

import asyncio
import itertools
import json
import signal
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path

from hatchvm.vmm.base import (
    BootSpec,
    Capabilities,
    ExitInfo,
    Feature,
    RunningVM,
    VMMError,
    VMMFilesMissing,
    VMMNotRunning,
    VMMRequestFailed,
)

STATE_MAGIC = "fake-vmm-state"


@dataclass
class FakeProcess:
    pid: int
    vm_id: str
    vm_dir: Path
    mem_mib: int
    mem_file: Path | None
    state: str = "not started"  # "running", "paused", "incoming" (start_incoming)
    # incoming: the spec it was started for and (device, inode) of its files, as QEMU's
    ahead: tuple[BootSpec, tuple[tuple[int, int], ...]] | None = None
    exit: ExitInfo | None = None
    ended: asyncio.Event = field(default_factory=asyncio.Event)

    def end(self, info: ExitInfo) -> None:
        if self.exit is None:
            self.exit = info
            self.ended.set()


class FakeHost:
    """The machine fake VMs run on."""

    def __init__(self) -> None:
        self.processes: dict[str, FakeProcess] = {}
        self.stubborn = False  # guests ignore a graceful stop
        self.calls: list[tuple[str, str]] = []  # (operation, vm id), in order
        self.settled: list[list[str]] = []
        self._failures: dict[str, VMMError] = {}
        self._pids = itertools.count(100_000)

    def fail(self, op: str, error: VMMError | None = None) -> None:
        """Every call of op fails with error until cleared (fail(op, None))."""
        if error is None:
            self._failures.pop(op, None)
        else:
            self._failures[op] = error

    def crash(self, vm_id: str, exit_code: int | None = None, sig: int | None = None) -> None:
        """The VM's VMM ends behind hatchd's back (by default: killed by SIGKILL)."""
        if exit_code is None and sig is None:
            sig = signal.SIGKILL
        proc = self.processes.pop(vm_id)
        proc.end(ExitInfo(at=datetime.now(UTC), exit_code=exit_code, signal=sig))

    def running(self, vm_id: str) -> FakeProcess | None:
        return self.processes.get(vm_id)


class FakeVMM:
    def __init__(
        self,
        host: FakeHost | None = None,
        features: Feature = Feature.SNAPSHOTS,
    ) -> None:
        self.host = host or FakeHost()
        self.features = features

    def _check(self, op: str, vm_id: str) -> None:
        self.host.calls.append((op, vm_id))
        if (error := self.host._failures.get(op)) is not None:
            raise type(error)(str(error), vm_id=vm_id, op=op)

    def _proc(self, vm_id: str, op: str) -> FakeProcess:
        proc = self.host.processes.get(vm_id)
        if proc is None:
            raise VMMNotRunning("no vmm process", vm_id=vm_id, op=op)
        return proc

    async def capabilities(self) -> Capabilities:
        return Capabilities(name="fake", accel="none", features=self.features)

    def memory_footprint_mib(self, mem_mib: int) -> int:
        return mem_mib + 32

    async def settle(self, running: list[RunningVM]) -> None:
        self.host.settled.append(sorted(vm.vm_id for vm in running))

    def console_socket(self, vm_dir: Path) -> Path:
        return vm_dir / "fake-console.sock"  # never served: the fake has no console

    def _start(self, spec: BootSpec, state: str) -> int:
        if (old := self.host.processes.pop(spec.vm_id, None)) is not None:
            old.end(ExitInfo(at=datetime.now(UTC), signal=signal.SIGKILL))
        proc = FakeProcess(
            pid=next(self.host._pids),
            vm_id=spec.vm_id,
            vm_dir=spec.vm_dir,
            mem_mib=spec.mem_mib,
            mem_file=spec.mem_file,
            state=state,
        )
        self.host.processes[spec.vm_id] = proc
        return proc.pid

    async def boot(self, spec: BootSpec) -> int:
        self._check("boot", spec.vm_id)
        for what, path in (
            ("kernel", spec.kernel),
            ("root disk", spec.rootfs),
            ("disk", spec.disk),
        ):
            if not path.exists():
                raise VMMFilesMissing(f"{what} {path} does not exist", vm_id=spec.vm_id, op="boot")
        if spec.mem_file is not None:  # like QEMU: RAM is the file, made at boot
            with spec.mem_file.open("wb") as mem:
                mem.truncate(spec.mem_mib << 20)
        return self._start(spec, "not started")

    async def resume(self, vm_id: str, vm_dir: Path) -> None:
        self._check("resume", vm_id)
        self._proc(vm_id, "resume").state = "running"

    async def resume_if_paused(self, vm_id: str, vm_dir: Path) -> bool:
        self._check("resume_if_paused", vm_id)
        proc = self.host.processes.get(vm_id)
        if proc is None:
            return False
        proc.state = "running"
        return True

    async def alive(self, vm_id: str, vm_dir: Path) -> int | None:
        proc = self.host.processes.get(vm_id)
        return proc.pid if proc is not None and proc.vm_dir == vm_dir else None

    async def processes(self, vms_dir: Path) -> dict[str, int]:
        return {p.vm_id: p.pid for p in self.host.processes.values() if p.vm_dir.parent == vms_dir}

    async def stop(self, vm_id: str, vm_dir: Path, timeout: float) -> None:
        self._check("stop", vm_id)
        proc = self.host.processes.get(vm_id)
        if proc is None:
            return
        if proc.state == "running" and not self.host.stubborn:
            self.host.processes.pop(vm_id)
            proc.end(ExitInfo(at=datetime.now(UTC), reason="guest-shutdown", exit_code=0))
            return
        await self.kill(vm_id, vm_dir)  # ignored (or paused): the timeout passes, then a kill

    async def kill(self, vm_id: str, vm_dir: Path) -> None:
        self._check("kill", vm_id)
        proc = self.host.processes.pop(vm_id, None)
        if proc is not None:
            proc.end(ExitInfo(at=datetime.now(UTC), signal=signal.SIGKILL))

    async def snapshot(self, vm_id: str, vm_dir: Path, state_file: Path) -> None:
        self._check("snapshot", vm_id)
        proc = self._proc(vm_id, "snapshot")
        proc.state = "paused"
        state = {"magic": STATE_MAGIC, "vm_id": vm_id, "mem_mib": proc.mem_mib}
        state_file.write_text(json.dumps(state))
        await self.kill(vm_id, vm_dir)

    async def capture(
        self,
        vm_id: str,
        vm_dir: Path,
        state_file: Path,
        meanwhile: Callable[[], Awaitable[None]] | None = None,
    ) -> None:
        self._check("capture", vm_id)
        self._proc(vm_id, "capture").state = "paused"
        state_file.write_text(json.dumps({"magic": STATE_MAGIC, "vm_id": vm_id}))
        if meanwhile is not None:
            await meanwhile()

    async def start_incoming(self, spec: BootSpec) -> bool:
        """A process waiting for its state, which restore() takes when it fits (as QEMU's)."""
        self._check("start_incoming", spec.vm_id)
        for path in (spec.mem_file, spec.disk):
            if path is None or not path.exists():
                raise VMMFilesMissing(f"{path} does not exist", vm_id=spec.vm_id, op="restore")
        self._start(spec, "incoming")
        self.host.processes[spec.vm_id].ahead = (spec, _identities(spec))
        return True

    async def discard_incoming(self, vm_id: str, vm_dir: Path) -> bool:
        proc = self.host.processes.get(vm_id)
        if proc is None or proc.state != "incoming":
            return False
        await self.kill(vm_id, vm_dir)
        return True

    async def restore(self, spec: BootSpec, state_file: Path) -> int:
        self._check("restore", spec.vm_id)
        for what, path in (("memory file", spec.mem_file), ("state file", state_file)):
            if path is None or not path.exists():
                await self.discard_incoming(spec.vm_id, spec.vm_dir)
                raise VMMFilesMissing(
                    f"{what} {path} does not exist", vm_id=spec.vm_id, op="restore"
                )
        try:
            state = json.loads(state_file.read_text())
            good = state["magic"] == STATE_MAGIC and state["vm_id"] == spec.vm_id
        except (ValueError, KeyError, TypeError):
            good = False
        if not good:
            await self.discard_incoming(spec.vm_id, spec.vm_dir)
            raise VMMRequestFailed(
                f"state file {state_file} is not this vm's", vm_id=spec.vm_id, op="restore"
            )
        proc = self.host.processes.get(spec.vm_id)
        ahead = (spec, _identities(spec))
        if proc is not None and proc.state == "incoming" and proc.ahead == ahead:
            proc.state, proc.ahead = "paused", None
            self.host.calls.append(("restore-ahead", spec.vm_id))
            return proc.pid
        return self._start(spec, "paused")

    async def wait_exit(self, vm_id: str, vm_dir: Path) -> ExitInfo:
        proc = self.host.processes.get(vm_id)
        if proc is None:
            return ExitInfo(at=datetime.now(UTC))
        await proc.ended.wait()
        assert proc.exit is not None
        return proc.exit


def _identities(spec: BootSpec) -> tuple[tuple[int, int], ...]:
    paths = [p for p in (spec.mem_file, spec.disk) if p is not None]
    return tuple((st.st_dev, st.st_ino) for st in (p.stat() for p in paths))
