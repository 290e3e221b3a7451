"""The Firecracker driver, written to Firecracker's published API (its swagger file) and proved
against it with a test double; it has not yet run a real guest (see README).

Firecracker runs in the foreground and is configured over HTTP on its API socket. hatchd
starts it in its own session, stdin from /dev/null and stdout/stderr to a file in the VM's
directory, so it outlives hatchd; hatchd is its parent (and, after -daemonize-like orphaning,
the subreaper: vmm/process.py), so it reaps it and reads its exit status. Its pid file, the
record of its memory file and its logs live in the VM's directory; its API socket and its
pipes (serial console, log, metrics: vmm/fifo.py) in a short directory under HATCH_RUN_DIR.

A boot configures everything and stops before InstanceStart (the guest's first instruction):
resume() starts it once hatchd records the console. A snapshot pauses the guest and writes a
full snapshot (all guest RAM to the memory file, device state to the state file); a restore
maps that memory file privately (it stays intact) in a fresh process. Deaths are seen through
a pidfd: Firecracker has no event channel, so an exit says only its code or signal.

With a jailer (vmm/fc_jail.py) Firecracker is started through it, chrooted as the VM's own uid:
the files it is given are placed in its jail first and it is handed their paths there; the
sockets directory under HATCH_RUN_DIR is then a link to the jail's own directory, where its
API socket and pipes are linked out of the jail. Neither --daemonize
nor --new-pid-ns is passed, so the jailer execs Firecracker in the process hatchd started and
everything above (pid file, pidfd, exit status) holds as unjailed.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import json
import os
import shutil
import signal
import time
from collections.abc import Awaitable, Callable
from datetime import UTC, datetime
from pathlib import Path

import structlog

from hatchvm.vmm import fc_jail, fifo
from hatchvm.vmm.base import (
    BootSpec,
    Capabilities,
    ExitInfo,
    Feature,
    RunningVM,
    VMMError,
    VMMFilesMissing,
    VMMNotRunning,
    VMMStartFailed,
    VMMUnsupported,
)
from hatchvm.vmm.cgroups import CgroupError, Limits, VMCgroups
from hatchvm.vmm.environment import vmm_environment
from hatchvm.vmm.fc_api import FirecrackerAPI, wait_api
from hatchvm.vmm.fc_jail import Jailer, JailError, jail_id
from hatchvm.vmm.fc_models import (
    BootSource,
    Drive,
    EntropyDevice,
    InstanceActionInfo,
    Logger,
    MachineConfiguration,
    MemoryBackend,
    Metrics,
    NetworkInterface,
    SerialDevice,
    SnapshotCreateParams,
    SnapshotLoadParams,
    Vm,
)
from hatchvm.vmm.overhead import memory_limit_mib
from hatchvm.vmm.process import process_ended, processes_with_arg, wait_process

log = structlog.get_logger("hatchvm.vmm")

PID_FILE = "firecracker.pid"
RECORD = "firecracker.json"  # what a restarted hatchd needs to snapshot the VM (its memory file)
OUT_FILE = "firecracker.out"  # stdout and stderr: what it says before its logger is set up
LOG_FILE = "firecracker.log"  # its log, drained from LOG_FIFO while hatchd watches it
METRICS_FILE = "firecracker.metrics"
API_SOCKET = "api.sock"
CONSOLE_FIFO = "console.fifo"
LOG_FIFO = "log.fifo"
METRICS_FIFO = "metrics.fifo"
LOG_MAX_BYTES = 1 << 20
IFACE_ID = "eth0"
API_READY_TIMEOUT = 10.0  # from exec to an answering API socket (Firecracker takes ms)
KILL_TIMEOUT = 10.0
LOAD_TIMEOUT = 30.0  # a snapshot load maps the memory file: it reads only the state
SNAPSHOT_TIMEOUT = 30.0  # plus the time to write guest RAM at SNAPSHOT_MIB_PER_S
SNAPSHOT_MIB_PER_S = 100
DRAIN_TIMEOUT = 2.0
# Firecracker exits 0 when the guest resets the CPU (reboot=k: the i8042 reset line): on x86 a
# guest has no other way to end it (no ACPI power-off), so a reboot, a panic (panic=1) and an
# orderly shutdown that ends in a reset all look alike.
_CLEAN_EXIT_REASON = "guest-reset"
_HOST_SIGNALS = {signal.SIGTERM, signal.SIGINT, signal.SIGHUP}


def sockets_dir(run_dir: Path, vm_dir: Path) -> Path:
    """The VM's directory under run_dir: one per data directory (a hash of it) and VM, so
    socket paths stay under 108 bytes whatever the data directory's length."""
    data = hashlib.sha256(os.fsencode(vm_dir.parent)).hexdigest()[:12]
    return run_dir / data / vm_dir.name


def _read_pid(vm_dir: Path) -> int | None:
    try:
        return int((vm_dir / PID_FILE).read_text().strip())
    except (OSError, ValueError):
        return None


def _is_ours(pid: int, api_socket: Path) -> bool:
    """pid is alive and is the Firecracker serving this API socket (a recycled pid, or another
    daemon's Firecracker, does not count)."""
    try:
        args = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except OSError:
        return False
    if state == "Z" or b"--api-sock" not in args:
        return False
    at = args.index(b"--api-sock") + 1
    return at < len(args) and args[at] == os.fsencode(api_socket)


def _running(pid: int) -> bool:
    """The process exists and has not ended (a zombie has)."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False


def _reap(pid: int) -> None:
    """Collect the exit status of a Firecracker that is hatchd's child, so no zombie is left;
    its watch (wait_exit) may have done so already."""
    with contextlib.suppress(ChildProcessError):
        os.waitpid(pid, os.WNOHANG)


def _tail(path: Path, lines: int = 5) -> str:
    try:
        text = path.read_text(errors="replace").strip().splitlines()[-lines:]
    except OSError:
        return "(no output)"
    return " | ".join(text) or "(it printed nothing)"


class FirecrackerVMM:
    def __init__(
        self,
        firecracker_bin: str,
        run_dir: Path,
        kvm_usable: bool = True,
        cgroups: VMCgroups | None = None,
        start_timeout: float = API_READY_TIMEOUT,
        jailer: Jailer | None = None,
    ) -> None:
        self.firecracker_bin = firecracker_bin
        self.jailer = jailer  # None: Firecracker runs as hatchd's user, unconfined
        self.start_timeout = start_timeout
        self.run_dir = run_dir
        self.kvm_usable = kvm_usable
        self.cgroups = cgroups
        # A writer's end of the console pipe per VM between boot and InstanceStart: Firecracker
        # opens the pipe only when the guest starts, and the console recorder, attached before,
        # would otherwise read EOF at once.
        self._console_keepers: dict[str, int] = {}

    # ---- paths -------------------------------------------------------------------------

    def sockets(self, vm_dir: Path) -> Path:
        """The API socket's and pipes' directory; under the jailer a link to the jail's own
        directory, where they are linked out of the jail (the path to the socket stays short
        whatever the jail's is)."""
        return sockets_dir(self.run_dir, vm_dir)

    def _in_vmm(self, vm_dir: Path, name: str) -> str:
        """The path Firecracker is given for a file in its sockets directory."""
        if self.jailer is not None:
            return f"{fc_jail.RUN_DIR}/{name}"
        return str(self.sockets(vm_dir) / name)

    def _cgroup_name(self, vm_id: str) -> str:
        # The jailer names the group after its --id.
        return jail_id(vm_id) if self.jailer is not None else vm_id

    def api_socket(self, vm_dir: Path) -> Path:
        return self.sockets(vm_dir) / API_SOCKET

    def console_socket(self, vm_dir: Path) -> Path:
        return self.sockets(vm_dir) / CONSOLE_FIFO

    def _api(self, vm_id: str, vm_dir: Path) -> FirecrackerAPI:
        return FirecrackerAPI(self.api_socket(vm_dir), vm_id)

    # ---- what the driver is ------------------------------------------------------------

    async def capabilities(self) -> Capabilities:
        # No guest agent yet: it speaks virtio-serial, which Firecracker has not (vsock only).
        return Capabilities(
            name="firecracker",
            accel="kvm" if self.kvm_usable else "none",  # none: its guests cannot run here
            features=Feature.SNAPSHOTS | Feature.CONSOLE,
        )

    def memory_footprint_mib(self, mem_mib: int) -> int:
        # Not measured for Firecracker: QEMU's formula without TCG's cache, an upper bound
        # (Firecracker's own overhead is a few MiB, QEMU's about 35).
        return memory_limit_mib(mem_mib, 0)

    def _limits(self, vcpu_count: int, mem_mib: int) -> Limits:
        return Limits(memory_bytes=self.memory_footprint_mib(mem_mib) << 20, vcpus=vcpu_count)

    # ---- processes ---------------------------------------------------------------------

    async def alive(self, vm_id: str, vm_dir: Path) -> int | None:
        pid = _read_pid(vm_dir)
        if pid is None:
            return None
        if self.jailer is not None:
            return pid if self.jailer.is_ours(pid, vm_id) else None
        return pid if _is_ours(pid, self.api_socket(vm_dir)) else None

    async def processes(self, vms_dir: Path) -> dict[str, int]:
        """The Firecrackers whose API sockets belong to VMs under vms_dir, by VM id: read from
        their command lines, so another daemon's or a test's are never counted."""
        if self.jailer is not None:
            return self._jailed_processes(vms_dir)
        root = sockets_dir(self.run_dir, vms_dir / "x").parent
        found: dict[str, int] = {}
        for pid, sock in processes_with_arg(b"--api-sock"):
            if sock.name == API_SOCKET and sock.parent.parent == root and _is_ours(pid, sock):
                found[sock.parent.name] = pid
        return found

    def _jailed_processes(self, vms_dir: Path) -> dict[str, int]:
        """The jailed Firecrackers of VMs under vms_dir: each jail records its VM's directory,
        whose pid file names a process that must be chrooted in that jail (a jailed process
        can rewrite its command line, not its root)."""
        assert self.jailer is not None
        found: dict[str, int] = {}
        for _, vm_dir in self.jailer.jails():
            if vm_dir is None or vm_dir.parent != vms_dir:
                continue
            pid = _read_pid(vm_dir)
            if pid is not None and self.jailer.is_ours(pid, vm_dir.name):
                found[vm_dir.name] = pid
        return found

    async def _spawn(
        self,
        vm_id: str,
        vm_dir: Path,
        vcpu_count: int,
        mem_mib: int,
        files: dict[str, tuple[Path, bool]],
        tap: str | None,
    ) -> tuple[int, dict[str, str]]:
        """Start Firecracker (its API socket answering, nothing configured); its pid and the
        paths it is to be given for files (role: (host path, writable)): the same paths
        unjailed, their places in its jail under the jailer."""
        await self._forget(vm_id, vm_dir)
        sock = self.sockets(vm_dir)
        api_socket = sock / API_SOCKET
        if self.jailer is None:
            sock.mkdir(mode=0o700, parents=True, exist_ok=True)
            for name in (CONSOLE_FIFO, LOG_FIFO, METRICS_FIFO):
                fifo.make_fifo(sock / name)
            paths = {role: str(path) for role, (path, _) in files.items()}
            cmd = [self.firecracker_bin, "--api-sock", str(api_socket), "--id", jail_id(vm_id)]
            if self.cgroups is not None:
                try:
                    await asyncio.to_thread(
                        self.cgroups.create, vm_id, self._limits(vcpu_count, mem_mib)
                    )
                except CgroupError as exc:
                    raise VMMStartFailed(str(exc), vm_id=vm_id, op="start") from None
                cmd = self.cgroups.launcher(vm_id) + cmd
        else:
            cmd, paths = self._jail(vm_id, vm_dir, vcpu_count, mem_mib, files, tap)
        # Jailed, the socket is watched for where Firecracker makes it, then linked out.
        wait_for = api_socket
        if self.jailer is not None:
            wait_for = self.jailer.jail(vm_id).host(fc_jail.API_SOCKET)
        out = vm_dir / OUT_FILE
        out_fd = os.open(out, os.O_WRONLY | os.O_CREAT | os.O_APPEND | os.O_CLOEXEC, 0o600)
        try:
            # posix_spawn, not asyncio's subprocess: no child watcher may reap it behind the
            # pidfd watch (wait_exit), which reads its exit status. It returns once the child
            # runs (vfork), so it does not block the loop for long.
            pid = os.posix_spawnp(  # noqa: ASYNC221
                cmd[0],
                cmd,
                vmm_environment(),
                file_actions=[
                    (os.POSIX_SPAWN_OPEN, 0, os.devnull, os.O_RDONLY, 0),
                    (os.POSIX_SPAWN_DUP2, out_fd, 1),
                    (os.POSIX_SPAWN_DUP2, out_fd, 2),
                ],
                setsid=True,  # its own session and process group: hatchd's signals stay hatchd's
            )
        except OSError as exc:
            raise VMMStartFailed(
                f"cannot run {cmd[0]}: {exc.strerror}", vm_id=vm_id, op="start"
            ) from None
        finally:
            os.close(out_fd)
        (vm_dir / PID_FILE).write_text(f"{pid}\n")
        deadline = time.monotonic() + self.start_timeout
        # Not _is_ours yet: under the cgroup launcher it is `sh` until it execs Firecracker.
        started = await wait_api(wait_for, lambda: _running(pid), deadline)
        if started and self.jailer is not None:
            try:
                self.jailer.link_api_socket(self.jailer.jail(vm_id))
            except JailError as exc:
                log.warning("jailed firecracker's api socket unusable", vm_id=vm_id, error=str(exc))
                started = False
        if not started:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
            await process_ended(pid, KILL_TIMEOUT)
            _reap(pid)
            await self._forget(vm_id, vm_dir)
            raise VMMStartFailed(
                f"firecracker did not open its API socket within {self.start_timeout:g}s: "
                f"{_tail(out)}",
                vm_id=vm_id,
                op="start",
            )
        return pid, paths

    def _jail(
        self,
        vm_id: str,
        vm_dir: Path,
        vcpu_count: int,
        mem_mib: int,
        files: dict[str, tuple[Path, bool]],
        tap: str | None,
    ) -> tuple[list[str], dict[str, str]]:
        """The VM's jail, filled (its pipes, its files; its TAP made the uid's), and the
        jailer's command line."""
        assert self.jailer is not None
        sock = self.sockets(vm_dir)
        try:
            jail = self.jailer.prepare(vm_id, vm_dir)
            for name in (CONSOLE_FIFO, LOG_FIFO, METRICS_FIFO):
                self.jailer.make_fifo(jail, name)
            paths = {
                role: self.jailer.place(jail, role, path, writable)
                for role, (path, writable) in files.items()
            }
            if tap is not None:
                fc_jail.give_tap(tap, jail.owner())
            sock.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
            sock.symlink_to(jail.dir)
        except (JailError, OSError) as exc:
            with contextlib.suppress(JailError):
                self.jailer.remove(self.jailer.jail(vm_id))
            sock.unlink(missing_ok=True)
            raise VMMStartFailed(str(exc), vm_id=vm_id, op="start") from None
        limits = self._limits(vcpu_count, mem_mib) if self.cgroups is not None else None
        cmd = self.jailer.command(jail, limits, ["--api-sock", fc_jail.API_SOCKET])
        return cmd, paths

    async def _setup_outputs(self, api: FirecrackerAPI, vm_dir: Path) -> None:
        """Logger, metrics and serial console into their pipes (allowed before a snapshot
        load too: they are not part of a snapshot)."""
        log_path, metrics_path = self._in_vmm(vm_dir, LOG_FIFO), self._in_vmm(vm_dir, METRICS_FIFO)
        await api.put("/logger", Logger(log_path=log_path, level="Warning"))
        await api.put("/metrics", Metrics(metrics_path=metrics_path))
        await api.put("/serial", SerialDevice(serial_out_path=self._in_vmm(vm_dir, CONSOLE_FIFO)))

    def _write_record(self, spec: BootSpec) -> None:
        record = {"mem_file": str(spec.mem_file) if spec.mem_file else None, "mem": spec.mem_mib}
        (spec.vm_dir / RECORD).write_text(json.dumps(record))

    def _mem_file(self, vm_id: str, vm_dir: Path) -> Path:
        try:
            mem = json.loads((vm_dir / RECORD).read_text())["mem_file"]
        except (OSError, ValueError, KeyError, TypeError):
            mem = None
        if not mem:
            raise VMMFilesMissing(
                f"{RECORD} does not say where its memory goes", vm_id=vm_id, op="snapshot"
            )
        return Path(mem)

    # ---- boot --------------------------------------------------------------------------

    async def boot(self, spec: BootSpec) -> int:
        kernel = spec.vmlinux
        if kernel is None:
            raise VMMFilesMissing(
                "the image has no uncompressed vmlinux (Firecracker cannot boot a bzImage)",
                vm_id=spec.vm_id,
                op="boot",
            )
        needed = {"kernel": kernel, "initrd": spec.initrd, "root disk": spec.rootfs}
        needed["disk"] = spec.disk
        for what, path in needed.items():
            if path is not None and not path.exists():
                raise VMMFilesMissing(f"{what} {path} does not exist", vm_id=spec.vm_id, op="boot")
        files = {"kernel": (kernel, False), "base": (spec.rootfs, False), "disk": (spec.disk, True)}
        if spec.initrd is not None:
            files["initrd"] = (spec.initrd, False)
        pid, paths = await self._spawn(
            spec.vm_id, spec.vm_dir, spec.vcpu_count, spec.mem_mib, files, spec.tap_name
        )
        self._write_record(spec)
        cmdline = spec.cmdline if "pci=off" in spec.cmdline else f"{spec.cmdline} pci=off"
        try:
            async with self._api(spec.vm_id, spec.vm_dir) as api:
                await self._setup_outputs(api, spec.vm_dir)
                self._keep_console(spec.vm_id, spec.vm_dir)
                await api.put(
                    "/boot-source",
                    BootSource(
                        kernel_image_path=paths["kernel"],
                        initrd_path=paths.get("initrd"),
                        boot_args=cmdline,
                    ),
                )
                await api.put(
                    "/machine-config",
                    MachineConfiguration(
                        vcpu_count=spec.vcpu_count, mem_size_mib=spec.mem_mib, smt=False
                    ),
                )
                # No root device: the initramfs mounts the base (vda) under the disk's overlay
                # (vdb); drives appear in the order they are added.
                for drive_id, read_only in (("base", True), ("disk", False)):
                    drive = Drive(
                        drive_id=drive_id,
                        is_root_device=False,
                        path_on_host=paths[drive_id],
                        is_read_only=read_only,
                    )
                    await api.put(f"/drives/{drive_id}", drive)
                if spec.tap_name:
                    nic = NetworkInterface(
                        iface_id=IFACE_ID, host_dev_name=spec.tap_name, guest_mac=spec.guest_mac
                    )
                    await api.put(f"/network-interfaces/{IFACE_ID}", nic)
                await api.put("/entropy", EntropyDevice())
        except VMMError:
            await self.kill(spec.vm_id, spec.vm_dir)
            raise
        return pid

    def _keep_console(self, vm_id: str, vm_dir: Path) -> None:
        self._drop_console_keeper(vm_id)
        with contextlib.suppress(OSError):
            fd = fifo.open_fifo_fd(self.console_socket(vm_dir), os.O_RDWR)
            self._console_keepers[vm_id] = fd

    def _drop_console_keeper(self, vm_id: str) -> None:
        fd = self._console_keepers.pop(vm_id, None)
        if fd is not None:
            os.close(fd)

    async def resume(self, vm_id: str, vm_dir: Path) -> None:
        if await self.alive(vm_id, vm_dir) is None:
            raise VMMNotRunning("firecracker is not running", vm_id=vm_id, op="resume")
        async with self._api(vm_id, vm_dir) as api:
            if await api.state() == "Not started":
                await api.put("/actions", InstanceActionInfo(action_type="InstanceStart"))
            else:
                await api.patch("/vm", Vm(state="Resumed"))
            state = await api.state()
        self._drop_console_keeper(vm_id)  # Firecracker holds the console pipe open now
        if state != "Running":
            raise VMMError(f"the vm is {state} after resuming", vm_id=vm_id, op="resume")

    async def resume_if_paused(self, vm_id: str, vm_dir: Path) -> bool:
        if await self.alive(vm_id, vm_dir) is None:
            return False
        async with self._api(vm_id, vm_dir) as api:
            if await api.state() == "Running":
                return True
        await self.resume(vm_id, vm_dir)
        return True

    # ---- stop --------------------------------------------------------------------------

    async def stop(self, vm_id: str, vm_dir: Path, timeout: float) -> None:
        """Ctrl-Alt-Del (the guest shuts down and resets the CPU, which ends Firecracker),
        a bounded wait, then kill. A guest that is not running cannot hear it: killed."""
        pid = await self.alive(vm_id, vm_dir)
        if pid is None:
            await self._forget(vm_id, vm_dir)
            return
        try:
            async with self._api(vm_id, vm_dir) as api:
                if await api.state() == "Running":
                    await api.put("/actions", InstanceActionInfo(action_type="SendCtrlAltDel"))
                    if not await process_ended(pid, timeout):
                        log.warning("guest ignored ctrl-alt-del, killing", vm_id=vm_id)
        except VMMError as exc:
            log.warning("ctrl-alt-del not delivered, killing", vm_id=vm_id, error=str(exc))
        await self.kill(vm_id, vm_dir)

    async def kill(self, vm_id: str, vm_dir: Path) -> None:
        pid = await self.alive(vm_id, vm_dir)
        if pid is not None:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
            if not await process_ended(pid, KILL_TIMEOUT):
                raise VMMError(f"firecracker pid {pid} survived SIGKILL", vm_id=vm_id, op="kill")
            _reap(pid)
        await self._forget(vm_id, vm_dir)

    async def _forget(self, vm_id: str, vm_dir: Path) -> None:
        self._drop_console_keeper(vm_id)
        (vm_dir / PID_FILE).unlink(missing_ok=True)
        sock = self.sockets(vm_dir)
        if sock.is_symlink():
            sock.unlink()
        else:
            shutil.rmtree(sock, ignore_errors=True)
        if self.cgroups is not None:
            try:
                await asyncio.to_thread(self.cgroups.remove, self._cgroup_name(vm_id))
            except CgroupError as exc:  # the next start-up's sweep retries
                log.warning("vm cgroup left behind", vm_id=vm_id, reason=str(exc))
        if self.jailer is not None:
            try:
                await asyncio.to_thread(self.jailer.remove, self.jailer.jail(vm_id))
            except JailError as exc:  # the next start-up's sweep retries
                log.warning("vm jail left behind", vm_id=vm_id, reason=str(exc))

    # ---- snapshot / restore ------------------------------------------------------------

    async def capture(
        self,
        vm_id: str,
        vm_dir: Path,
        state_file: Path,
        meanwhile: Callable[[], Awaitable[None]] | None = None,
    ) -> None:
        raise VMMUnsupported("the firecracker driver does not support fork yet", vm_id=vm_id)

    async def snapshot(self, vm_id: str, vm_dir: Path, state_file: Path) -> None:
        """A full snapshot: guest RAM into the memory file, device state into state_file; then
        the process ends. RAM is written beside the memory file and renamed over it once the
        process is gone: a restored guest maps the old file, which must not change under it."""
        if await self.alive(vm_id, vm_dir) is None:
            raise VMMNotRunning("no running firecracker to snapshot", vm_id=vm_id, op="snapshot")
        mem_file = self._mem_file(vm_id, vm_dir)
        partial = mem_file.with_name(mem_file.name + ".partial")
        state_file.unlink(missing_ok=True)
        partial.unlink(missing_ok=True)
        mem_mib = json.loads((vm_dir / RECORD).read_text()).get("mem", 0)
        timeout = SNAPSHOT_TIMEOUT + int(mem_mib) / SNAPSHOT_MIB_PER_S
        state_path, mem_path = str(state_file), str(partial)
        if self.jailer is not None:
            try:
                state_path, mem_path = self.jailer.snapshot_targets(self.jailer.jail(vm_id))
            except (JailError, OSError) as exc:
                raise VMMError(str(exc), vm_id=vm_id, op="snapshot") from None
        try:
            async with self._api(vm_id, vm_dir) as api:
                await api.patch("/vm", Vm(state="Paused"))
                params = SnapshotCreateParams(
                    snapshot_type="Full",
                    snapshot_path=state_path,
                    mem_file_path=mem_path,
                )
                await api.put("/snapshot/create", params, timeout=timeout)
            if self.jailer is not None:
                self._take_out_snapshot(vm_id, state_file, partial)
            if not partial.exists() or not state_file.exists():
                raise VMMFilesMissing(
                    "firecracker reported success but wrote no snapshot files",
                    vm_id=vm_id,
                    op="snapshot",
                )
        except VMMError:
            partial.unlink(missing_ok=True)
            raise
        await self.kill(vm_id, vm_dir)
        partial.chmod(0o600)
        os.replace(partial, mem_file)

    def _take_out_snapshot(self, vm_id: str, state_file: Path, partial: Path) -> None:
        """The snapshot the jailed Firecracker wrote, out of its jail: root's, mode 0600."""
        assert self.jailer is not None
        jail = self.jailer.jail(vm_id)
        for in_jail, dest in ((fc_jail.NEW_STATE, state_file), (fc_jail.NEW_MEM, partial)):
            try:
                self.jailer.take_out(jail, in_jail, dest)
            except JailError as exc:
                state_file.unlink(missing_ok=True)
                raise VMMFilesMissing(str(exc), vm_id=vm_id, op="snapshot") from None

    async def start_incoming(self, spec: BootSpec) -> bool:
        """Nothing ahead: Firecracker loads its files as it starts (the jail gets them
        then), so restore() does it all once they are complete."""
        return False

    async def discard_incoming(self, vm_id: str, vm_dir: Path) -> bool:
        return False  # start_incoming() starts nothing

    async def restore(self, spec: BootSpec, state_file: Path) -> int:
        """A fresh Firecracker loads the snapshot (its memory file mapped privately, so it
        stays byte-identical), paused where it was."""
        for what, path in (("memory file", spec.mem_file), ("state file", state_file)):
            if path is None or not path.exists():
                raise VMMFilesMissing(
                    f"{what} {path} does not exist", vm_id=spec.vm_id, op="restore"
                )
        assert spec.mem_file is not None
        # The drives too: the state names them as they were configured (in the jail: the same
        # places for every VM).
        files = {
            "base": (spec.rootfs, False),
            "disk": (spec.disk, True),
            "state": (state_file, False),
            "mem": (spec.mem_file, False),
        }
        pid, paths = await self._spawn(
            spec.vm_id, spec.vm_dir, spec.vcpu_count, spec.mem_mib, files, spec.tap_name
        )
        self._write_record(spec)
        try:
            async with self._api(spec.vm_id, spec.vm_dir) as api:
                await self._setup_outputs(api, spec.vm_dir)
                params = SnapshotLoadParams(
                    snapshot_path=paths["state"],
                    mem_backend=MemoryBackend(backend_type="File", backend_path=paths["mem"]),
                    resume_vm=False,
                )
                # A failed load ends Firecracker ("too dirty to recover"): killed below anyway.
                await api.put("/snapshot/load", params, timeout=LOAD_TIMEOUT)
                state = await api.state()
            if state != "Paused":
                raise VMMError(
                    f"the vm is {state} after loading its snapshot", vm_id=spec.vm_id, op="restore"
                )
        except VMMError:
            await self.kill(spec.vm_id, spec.vm_dir)
            raise
        return pid

    # ---- watching ----------------------------------------------------------------------

    async def wait_exit(self, vm_id: str, vm_dir: Path) -> ExitInfo:
        """Wait for the process to end (a pidfd). Meanwhile its log and metrics pipes are
        drained into bounded files in the VM's directory."""
        pid = await self.alive(vm_id, vm_dir)
        if pid is None:
            return ExitInfo(at=datetime.now(UTC))
        sock = self.sockets(vm_dir)
        drains = [
            asyncio.create_task(fifo.drain(sock / LOG_FIFO, vm_dir / LOG_FILE, LOG_MAX_BYTES)),
            asyncio.create_task(
                fifo.drain(sock / METRICS_FIFO, vm_dir / METRICS_FILE, LOG_MAX_BYTES)
            ),
        ]
        try:
            info = await wait_process(pid)
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(asyncio.gather(*drains), DRAIN_TIMEOUT)
        finally:
            for task in drains:
                task.cancel()
        reason = None
        if info.exit_code == 0:
            reason = _CLEAN_EXIT_REASON
        elif info.signal in _HOST_SIGNALS:
            reason = "host-signal"
        return ExitInfo(at=info.at, reason=reason, exit_code=info.exit_code, signal=info.signal)

    async def settle(self, running: list[RunningVM]) -> None:
        if self.jailer is not None:
            await self._sweep_jails({vm.vm_id for vm in running})
        if self.cgroups is None:
            return
        for vm in running:
            pid = await self.alive(vm.vm_id, vm.vm_dir)
            if pid is None:
                continue
            try:
                limits = self._limits(vm.vcpu_count, vm.mem_mib)
                name = self._cgroup_name(vm.vm_id)
                if await asyncio.to_thread(self.cgroups.adopt, name, pid, limits):
                    log.warning("running vm moved into its cgroup", vm_id=vm.vm_id, pid=pid)
            except CgroupError as exc:
                log.warning("running vm keeps its old limits", vm_id=vm.vm_id, reason=str(exc))
        keep = {self._cgroup_name(vm.vm_id) for vm in running}
        removed, busy = await asyncio.to_thread(self.cgroups.sweep, keep)
        if removed:
            log.info("removed cgroups of vms that are gone", vms=removed)
        if busy:
            log.warning("cgroups of unknown vms still hold processes, left alone", vms=busy)

    async def _sweep_jails(self, keep: set[str]) -> None:
        """Remove the jails of VMs that no longer run (they died while no daemon watched)."""
        assert self.jailer is not None
        removed = []
        for jail, vm_dir in self.jailer.jails():
            if jail.vm_id in keep:
                continue
            if vm_dir is not None and await self.alive(jail.vm_id, vm_dir) is not None:
                continue  # a process no VM claims: reconcile decides about it, not the sweep
            try:
                await asyncio.to_thread(self.jailer.remove, jail)
                removed.append(jail.vm_id)
            except JailError as exc:
                log.warning("jail of a vm that is gone left behind", reason=str(exc))
        if removed:
            log.info("removed jails of vms that are gone", vms=removed)
