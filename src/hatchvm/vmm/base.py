"""The VMM driver interface. Drivers keep their own pids and control sockets inside vm_dir."""

from __future__ import annotations

import enum
import signal
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Protocol


class VMMError(Exception):
    """A VMM failed to do what it was asked; the message says what and why.

    Drivers raise the subclasses below, naming the VM and the operation; the API renders them
    (api/errors.py). The tree:

        VMMError
        ├── VMMStartFailed     the VMM process did not come up (bad binary, files, config)
        ├── VMMNotRunning      the operation needs a running VMM process and there is none
        ├── VMMFilesMissing    a file the operation needs (kernel, disk, memory, state) is absent
        ├── VMMTimeout         the VMM did not answer or finish within its bound
        ├── VMMRequestFailed   the VMM refused a request (QMP error, Firecracker fault_message)
        └── VMMUnsupported     the driver lacks the capability (declared in its Capabilities)
    """

    def __init__(self, message: str, *, vm_id: str | None = None, op: str | None = None) -> None:
        if vm_id is not None and op is not None:
            message = f"{op} of {vm_id}: {message}"
        super().__init__(message)
        self.message = message
        self.vm_id = vm_id
        self.op = op


class VMMStartFailed(VMMError):
    pass


class VMMNotRunning(VMMError):
    pass


class VMMFilesMissing(VMMError):
    pass


class VMMTimeout(VMMError):
    pass


class VMMRequestFailed(VMMError):
    pass


class VMMUnsupported(VMMError):
    pass


@dataclass(frozen=True)
class BootSpec:
    """Everything a driver needs to boot one VM."""

    vm_id: str
    vm_dir: Path  # per-VM directory: the driver's pid file, control socket, console.log
    kernel: Path  # compressed bzImage (QEMU)
    initrd: Path | None
    rootfs: Path  # read-only base image, first virtio disk (/dev/vda)
    disk: Path  # writable per-VM disk, second virtio disk (/dev/vdb)
    vcpu_count: int
    mem_mib: int
    cmdline: str  # complete kernel command line
    tap_name: str | None = None  # None: no NIC at all
    guest_mac: str | None = None
    # Guest RAM backed by this file (shared mapping): the file *is* the memory image, so a
    # snapshot only has to save the device state.
    mem_file: Path | None = None
    # False: mem_file is mapped privately (copy-on-write), never written: a fork's child runs
    # from a frozen memory image its siblings share, and its snapshots carry its RAM.
    mem_shared: bool = True
    incoming: bool = False  # wait for a device-state stream instead of booting the kernel
    vmlinux: Path | None = None  # the same kernel as an uncompressed ELF (Firecracker boots it)


@dataclass(frozen=True)
class ExitInfo:
    """How a VM's VMM process ended, as far as the driver could tell."""

    at: datetime
    # What the VMM reported before it ended: "guest-shutdown" (the guest powered off),
    # "guest-reset" (it rebooted or panicked: VMs run with -no-reboot), "guest-panic",
    # "host-signal", ...; None when it ended without a word (SIGKILL, a crash).
    reason: str | None = None
    exit_code: int | None = None  # None when unknown (the process was not hatchd's child)
    signal: int | None = None

    @property
    def clean(self) -> bool:
        """The guest asked to power off: not a failure."""
        return self.reason == "guest-shutdown" and not self.signal

    def describe(self) -> str:
        what = {
            "guest-shutdown": "the guest powered off",
            "guest-reset": "the guest rebooted or panicked",
            "guest-panic": "the guest's kernel panicked",
            "host-signal": "its VMM was stopped by a signal",
        }.get(self.reason or "", "its VMM process ended unexpectedly")
        if self.signal is not None:
            what += f" (signal {_signal_name(self.signal)})"
        elif self.exit_code:
            what += f" (exit code {self.exit_code})"
        return what


def _signal_name(number: int) -> str:
    try:
        return signal.Signals(number).name
    except ValueError:
        return str(number)


@dataclass(frozen=True)
class RunningVM:
    """A VM whose VMM process a restarted daemon found alive."""

    vm_id: str
    vm_dir: Path
    vcpu_count: int
    mem_mib: int


class Feature(enum.Flag):
    """What a driver can do beyond boot, stop and kill. core checks a feature before it calls
    (require()), so a missing one is a clear 501, never a hang or a crash."""

    NONE = 0
    SNAPSHOTS = enum.auto()  # snapshot() and restore()
    CONSOLE = enum.auto()  # console_socket() streams the guest's console
    AGENT = enum.auto()  # a host-guest channel for the guest agent (virtio-serial or vsock)
    TEMPLATES = enum.auto()  # warm templates: many VMs restored from one shared memory image
    FORK = enum.auto()  # capture() a running VM, restore with private memory


FEATURE_NAMES = {
    Feature.SNAPSHOTS: "snapshots",
    Feature.CONSOLE: "console recording",
    Feature.AGENT: "the guest agent",
    Feature.TEMPLATES: "warm templates",
    Feature.FORK: "fork",
}


@dataclass(frozen=True)
class Capabilities:
    name: str
    accel: str  # "kvm", "tcg", ...
    features: Feature = Feature.NONE
    extra: dict[str, str] = field(default_factory=dict)

    @property
    def snapshots(self) -> bool:
        return Feature.SNAPSHOTS in self.features

    def require(self, feature: Feature, vm_id: str | None = None) -> None:
        """Raise VMMUnsupported unless the driver has feature."""
        if feature not in self.features:
            what = FEATURE_NAMES.get(feature, str(feature.name).lower())
            where = f" (vm {vm_id})" if vm_id else ""
            raise VMMUnsupported(f"the {self.name} driver does not support {what} yet{where}")


class VMM(Protocol):
    """What `core` asks of a virtual machine monitor. All methods are idempotent where noted."""

    async def capabilities(self) -> Capabilities: ...

    def memory_footprint_mib(self, mem_mib: int) -> int:
        """Host memory a VM of mem_mib may use, the VMM's own overhead included."""
        ...

    async def settle(self, running: list[RunningVM]) -> None:
        """At start-up: the running VMs keep (or get back) their resource limits, and what
        VMs that died unwatched left behind is removed."""
        ...

    async def boot(self, spec: BootSpec) -> int:
        """Start the VM detached (it must outlive the daemon), paused before its first
        instruction; return its pid. resume() lets it run (once its console is recorded)."""
        ...

    def console_socket(self, vm_dir: Path) -> Path:
        """A Unix socket (QEMU) or named pipe (Firecracker) that streams the guest's console
        while its VMM runs. Called only when capabilities() has CONSOLE."""
        ...

    def agent_socket(self, vm_dir: Path) -> Path:
        """The Unix socket of the guest agent's port while the VMM runs. Called only when
        capabilities() has AGENT."""
        ...

    async def wait_exit(self, vm_id: str, vm_dir: Path) -> ExitInfo:
        """Wait until this VM's VMM process (running now) ends, and say how it ended."""
        ...

    async def processes(self, vms_dir: Path) -> dict[str, int]:
        """Every VMM process of VMs whose directories are under vms_dir, by VM id."""
        ...

    async def alive(self, vm_id: str, vm_dir: Path) -> int | None:
        """The pid of this VM's VMM process if it is still running, else None."""
        ...

    async def stop(self, vm_id: str, vm_dir: Path, timeout: float) -> None:
        """Graceful power-off, bounded by timeout, then kill. Idempotent."""
        ...

    async def kill(self, vm_id: str, vm_dir: Path) -> None:
        """End the VMM process at once. Idempotent."""
        ...

    async def snapshot(self, vm_id: str, vm_dir: Path, state_file: Path) -> None:
        """Pause the VM, write its device state to state_file and end the process. Afterwards
        the BootSpec's mem_file holds its memory (QEMU's RAM already is that file; Firecracker
        writes it); its disks are consistent with it. Called only with SNAPSHOTS."""
        ...

    async def start_incoming(self, spec: BootSpec) -> bool:
        """A head start for a restore: the VMM is started and waits for its state; restore()
        then only loads it. Used for a restore whose files are still being written (a fork's
        child, started while its parent is captured) and for a sleeping VM's wake standby.
        spec's mem_file and disk exist at their full sizes, and are only written into until
        restore(), never replaced. A driver that cannot start before its files are complete
        does nothing here and answers False."""
        ...

    async def discard_incoming(self, vm_id: str, vm_dir: Path) -> bool:
        """End the VMM start_incoming() started for this VM if no restore() has taken it
        (a wake standby given up); True if one was ended. Idempotent."""
        ...

    async def restore(self, spec: BootSpec, state_file: Path) -> int:
        """Start the VM from spec.mem_file and state_file, paused where it was; its pid. The
        VMM start_incoming() started is used when it was started for this spec and the files
        at its paths are still the ones it opened; otherwise it is ended and a new one started."""
        ...

    async def capture(
        self,
        vm_id: str,
        vm_dir: Path,
        state_file: Path,
        meanwhile: Callable[[], Awaitable[None]] | None = None,
    ) -> None:
        """Pause the VM and write its device state to state_file, leaving it paused and its
        process alive (resume_if_paused() lets it run on): meanwhile its memory file and disk
        are quiet and consistent with the state, to be copied. meanwhile(), if given, is run
        as soon as the guest is paused, while its state is written (it copies them); capture
        returns once both are done. Called only with FORK."""
        ...

    async def resume_if_paused(self, vm_id: str, vm_dir: Path) -> bool:
        """Let a guest left paused (an interrupted snapshot) run on; True if it runs."""
        ...

    async def resume(self, vm_id: str, vm_dir: Path) -> None:
        """Let a paused guest run (after boot or restore); raises unless it then runs."""
        ...
