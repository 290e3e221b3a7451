"""The QEMU microvm driver. A VM's QEMU runs detached (a session of its own), so it outlives
hatchd; its pid file, console and log live in the VM's directory, its sockets in the run
directory, and it runs in its own cgroup (vmm/cgroups.py) when the host has them."""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import hashlib
import os
import shutil
import signal
import socket
import time
from collections.abc import Awaitable, Callable
from datetime import UTC, datetime
from pathlib import Path

import structlog

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
)
from hatchvm.vmm.cgroups import CgroupError, Limits, VMCgroups
from hatchvm.vmm.clock import host_tsc_khz
from hatchvm.vmm.environment import vmm_environment
from hatchvm.vmm.overhead import memory_limit_mib
from hatchvm.vmm.process import (
    drain,
    high_fd,
    processes_with_arg,
    spawn,
    wait_child,
    watch_process,
)
from hatchvm.vmm.qmp import QMPSession, open_session, qmp_execute, qmp_session

log = structlog.get_logger("hatchvm.vmm")

PID_FILE = "qemu.pid"
QMP_SOCKET = "qmp.sock"
QMP_FD = 3  # the QMP socket's descriptor in QEMU (made by hatchd, see QemuVMM._start)
# A second QMP monitor, for events only: QEMU serves one client per monitor, and hatchd keeps
# this one open for the VM's whole life to hear why it ends.
EVENTS_SOCKET = "qmp-events.sock"
CONSOLE_SOCKET = "console.sock"
# The guest agent's virtio-serial port (hatchvm.agent talks to it); the agent finds the port by
# this name under /sys/class/virtio-ports.
AGENT_SOCKET = "agent.sock"
AGENT_PORT = "org.hatchvm.agent.0"
QEMU_LOG = "qemu.log"
SOCKETS = (QMP_SOCKET, EVENTS_SOCKET, CONSOLE_SOCKET, AGENT_SOCKET)
BOOT_TIMEOUT = 30.0
MIGRATION_TIMEOUT = 60.0
IGNORE_SHARED = {"capabilities": [{"capability": "x-ignore-shared", "state": True}]}
# The device state goes to and comes from a file QEMU is handed open (migration URI "fd:"), not
# through a command (exec:cat > file): QEMU reports a migration to an fd completed once every
# byte is in the file. A command could still be writing then, in the VM's cgroup, which is
# removed with whatever is left in it as soon as the VM is captured: under load the state lost
# its end, and its restores failed (or QEMU spun, waiting for the rest). Nothing is forked.
STATE_FD = "state"


def _read_pid(vm_dir: Path) -> int | None:
    try:
        return int((vm_dir / PID_FILE).read_text().strip())
    except (OSError, ValueError):
        return None


def _is_ours(pid: int, vm_id: str) -> bool:
    """The pid is alive and is the QEMU of this VM (a recycled pid must not count)."""
    try:
        cmdline = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except OSError:
        return False
    return state != "Z" and f"hatch-{vm_id}".encode() in b" ".join(cmdline)


async def _wait_gone(pid: int, vm_id: str, timeout: float) -> bool:
    # A killed QEMU is gone within milliseconds: look again soon, then less often (a wake that
    # ends a standby, a snapshot that ends the VMM, wait on this).
    deadline = time.monotonic() + timeout
    delay = 0.002
    while _is_ours(pid, vm_id):
        if time.monotonic() >= deadline:
            return False
        await asyncio.sleep(delay)
        delay = min(delay * 2, 0.05)
    return True


def reset_by_triple_fault(cmdline: str) -> str:
    """The image's reboot=k suits Firecracker, which resets on the keyboard controller; QEMU's
    microvm has none, so the kernel falls through to a jump into the firmware, which at times
    hangs a panicked guest forever instead of resetting it. A triple fault resets at once, and
    -no-reboot makes that reset QEMU's exit. Any other reboot= the VM's own boot_args chose
    (the last one counts) is kept."""
    chosen = [arg for arg in cmdline.split() if arg.startswith("reboot=")]
    if chosen and chosen[-1] == "reboot=k":
        return f"{cmdline} reboot=t"
    return cmdline


class QemuVMM:
    def __init__(
        self,
        qemu_bin: str,
        accel: str,
        run_dir: Path,
        tb_size_mib: int = 64,
        cgroups: VMCgroups | None = None,
    ) -> None:
        self.qemu_bin = qemu_bin
        self.accel = accel
        self.run_dir = run_dir
        self.tb_size_mib = tb_size_mib  # TCG's translation cache: bounded, it counts as memory
        self.cgroups = cgroups
        # The QMP connection of a restore, from loading the state until resume lets it run.
        self._restoring: dict[str, QMPSession] = {}
        # QEMUs start_incoming() started, waiting for their state, by VM id.
        self._incoming: dict[str, _Ahead] = {}
        # The read end of an incoming QEMU's output, by VM id, kept until its state is loaded:
        # QEMU 7.2 says only there why a load failed (and then exits).
        self._output: dict[str, int] = {}

    def sockets(self, vm_dir: Path) -> Path:
        """Where the VM's QEMU puts its control and console sockets. Not in vm_dir: a Unix
        socket's path must stay under 108 bytes, whatever the data directory's length. One
        directory per data directory (a hash of it) and VM."""
        data = hashlib.sha256(os.fsencode(vm_dir.parent)).hexdigest()[:12]
        return self.run_dir / data / vm_dir.name

    async def capabilities(self) -> Capabilities:
        features = Feature.SNAPSHOTS | Feature.CONSOLE | Feature.AGENT | Feature.FORK
        return Capabilities(name="qemu", accel=self.accel, features=features)

    def memory_footprint_mib(self, mem_mib: int) -> int:
        return memory_limit_mib(mem_mib, self.tb_size_mib if self.accel == "tcg" else 0)

    def _limits(self, vcpu_count: int, mem_mib: int) -> Limits:
        return Limits(memory_bytes=self.memory_footprint_mib(mem_mib) << 20, vcpus=vcpu_count)

    @staticmethod
    def _control_args(sock: Path, qmp_fd: int | None) -> list[str]:
        """The QMP monitor: on a socket QEMU makes at its path, or on one hatchd made and
        passes as descriptor qmp_fd (see _start)."""
        if qmp_fd is None:
            return ["-qmp", f"unix:{sock / QMP_SOCKET},server=on,wait=off"]
        chardev = f"socket,id=qmp,fd={qmp_fd},server=on,wait=off"
        return ["-chardev", chardev, "-mon", "chardev=qmp,mode=control"]

    def build_command(self, spec: BootSpec, qmp_fd: int | None = None) -> list[str]:
        d = spec.vm_dir
        sock = self.sockets(d)
        cmd = [
            self.qemu_bin,
            "-name",
            f"{spec.vm_id},process=hatch-{spec.vm_id}",
            # ACPI on: the Debian kernel finds microvm's virtio-mmio devices through it, and
            # system_powerdown reaches the guest as a power-button press. pit=on: without a
            # PIT the kernel can hang calibrating its clocks under TCG.
            "-M",
            "microvm,acpi=on,rtc=on,pcie=off,isa-serial=on,pit=on"
            + (",memory-backend=mem" if spec.mem_file else ""),
            "-accel",
            f"tcg,tb-size={self.tb_size_mib}" if self.accel == "tcg" else self.accel,
            "-cpu",
            "host" if self.accel == "kvm" else "max",
            "-smp",
            str(spec.vcpu_count),
            "-m",
            f"{spec.mem_mib}M",
            "-nodefaults",
            "-no-user-config",
            "-display",
            "none",
            "-no-reboot",
            "-kernel",
            str(spec.kernel),
        ]
        if spec.mem_file:
            cmd += [
                "-object",
                f"memory-backend-file,id=mem,size={spec.mem_mib}M,mem-path={spec.mem_file},"
                f"share={'on' if spec.mem_shared else 'off'}",
            ]
        if spec.initrd:
            cmd += ["-initrd", str(spec.initrd)]
        cmdline = spec.cmdline
        tsc_khz = host_tsc_khz()
        if self.accel == "tcg" and tsc_khz and "tsc_early_khz=" not in cmdline:
            # Under emulation the guest cannot time its TSC against the PIT reliably (a busy
            # host makes calibration fail and the boot hang): tell it the frequency instead.
            cmdline += f" tsc_early_khz={tsc_khz}"
        cmdline = reset_by_triple_fault(cmdline)
        cmd += [
            "-append",
            cmdline,
            "-drive",
            f"id=base,file={spec.rootfs},format=raw,if=none,read-only=on",
            "-device",
            "virtio-blk-device,drive=base",
            "-drive",
            f"id=disk,file={spec.disk},format=raw,if=none,discard=unmap",
            "-device",
            "virtio-blk-device,drive=disk",
        ]
        if spec.tap_name:
            cmd += [
                "-netdev",
                f"tap,id=net0,ifname={spec.tap_name},script=no,downscript=no",
                "-device",
                f"virtio-net-device,netdev=net0,mac={spec.guest_mac}",
            ]
        cmd += [
            # The guest agent's channel: no network needed, a virtio-serial port on a socket.
            # Added after the disks and the NIC, so they keep their virtio-mmio slots: a
            # snapshot taken before the port existed still restores (its guest never sees it).
            "-device",
            "virtio-serial-device,id=vser0,max_ports=2",
            "-chardev",
            f"socket,id=agent,path={sock / AGENT_SOCKET},server=on,wait=off",
            "-device",
            f"virtserialport,bus=vser0.0,nr=1,chardev=agent,name={AGENT_PORT}",
            # The console is a socket hatchd records (bounded on disk): with nobody connected
            # QEMU drops the output, so a guest can never fill the host's disk with it.
            "-chardev",
            f"socket,id=con,path={sock / CONSOLE_SOCKET},server=on,wait=off",
            "-serial",
            "chardev:con",
            *self._control_args(sock, qmp_fd),
            "-qmp",
            f"unix:{sock / EVENTS_SOCKET},server=on,wait=off",
            "-pidfile",
            str(d / PID_FILE),
            # Paused before the first instruction (or after an incoming migration): hatchd
            # attaches its console recorder and its watch, then lets the guest run.
            "-S",
        ]
        if spec.incoming:
            # Migration events: the restore hears when the state is loaded, without polling.
            cmd += ["-global", "migration.x-events=on", "-incoming", "defer"]
        return cmd

    def foreground_command(self, spec: BootSpec, console: Path) -> list[str]:
        """The same QEMU, for a caller that owns the process (benchmarks, the image test):
        in the foreground, running at once, its console written to a file. Its sockets
        directory must exist."""
        cmd = self.build_command(spec)
        cmd = cmd[: cmd.index("-pidfile")]  # no -pidfile, -S
        chardev = next(i for i, arg in enumerate(cmd) if arg.startswith("socket,id=con,"))
        cmd[chardev] = f"file,id=con,path={console}"
        return cmd

    def console_socket(self, vm_dir: Path) -> Path:
        return self.sockets(vm_dir) / CONSOLE_SOCKET

    def agent_socket(self, vm_dir: Path) -> Path:
        return self.sockets(vm_dir) / AGENT_SOCKET

    async def boot(self, spec: BootSpec) -> int:
        pid, qmp = await self._start(spec)
        try:
            status = (await qmp.execute("query-status")).get("status")
        finally:
            await qmp.close()
        if status != ("inmigrate" if spec.incoming else "prelaunch"):
            await self.kill(spec.vm_id, spec.vm_dir)
            raise VMMStartFailed(
                f"qemu started but the VM is {status}", vm_id=spec.vm_id, op="boot"
            )
        return pid

    async def _start(self, spec: BootSpec) -> tuple[int, QMPSession]:
        """Start the VM's QEMU; its pid and a QMP connection to it.

        QEMU runs as hatchd's child in a session of its own (so it outlives hatchd; hatchd,
        the subreaper, reads its exit status while it lives), started with posix_spawn (no
        copy of hatchd is made). Its QMP socket is bound and listening before QEMU starts and
        is handed to it as a descriptor: the connection made at once is greeted the moment
        QEMU's start-up is done, and reset if QEMU gives up, so nothing polls for either.
        QEMU's output goes into qemu.log until then; afterwards it leads nowhere (as with
        -daemonize), so a guest that makes QEMU complain cannot fill the host's disk. A QEMU
        waiting for its state keeps its output (a pipe: bounded) until the state is loaded."""
        if await self.alive(spec.vm_id, spec.vm_dir) is not None:
            await self.kill(spec.vm_id, spec.vm_dir)  # one QEMU per VM: never leave one behind
        await self._forget(spec.vm_id, spec.vm_dir)
        sock = self.sockets(spec.vm_dir)
        sock.mkdir(mode=0o700, parents=True, exist_ok=True)
        # QEMU would create the memory file with hatchd's umask; made here first, it is private.
        if spec.mem_file is not None:
            _make_private_file(spec.mem_file)
        cmd = self.build_command(spec, qmp_fd=QMP_FD)
        if self.cgroups is not None:
            limits = self._limits(spec.vcpu_count, spec.mem_mib)
            try:
                await asyncio.to_thread(self.cgroups.create, spec.vm_id, limits)
            except CgroupError as exc:
                raise VMMStartFailed(str(exc), vm_id=spec.vm_id, op="boot") from None
            cmd = self.cgroups.launcher(spec.vm_id) + cmd
        qmp_path = sock / QMP_SOCKET
        listener = _listen(qmp_path)
        control = high_fd(listener.fileno())
        listener.close()
        out_r, out_w = os.pipe2(os.O_CLOEXEC | os.O_NONBLOCK)  # QEMU's writes never block
        try:
            pid = spawn(cmd, out_w, vmm_environment(), {QMP_FD: control})
        except OSError as exc:
            os.close(out_r)
            raise VMMStartFailed(
                f"cannot run {self.qemu_bin}: {exc.strerror}", vm_id=spec.vm_id, op="boot"
            ) from None
        finally:
            os.close(control)
            os.close(out_w)
        log_path = spec.vm_dir / QEMU_LOG
        try:
            qmp: QMPSession | None = await open_session(qmp_path, connect_timeout=BOOT_TIMEOUT)
        except VMMError:
            qmp = None
        finally:
            with log_path.open("ab") as qlog:
                qlog.write(drain(out_r))
        if qmp is not None and _is_ours(pid, spec.vm_id):
            for name in SOCKETS:
                (sock / name).chmod(0o600)
            if spec.incoming:
                self._output[spec.vm_id] = out_r
            else:
                os.close(out_r)
            return pid, qmp
        os.close(out_r)
        if qmp is not None:
            await qmp.close()
        code = await wait_child(pid, 5.0)  # gone already, or killed now
        await self.kill(spec.vm_id, spec.vm_dir)
        raise VMMStartFailed(
            f"qemu failed to start (exit {code}): {_tail(log_path)}", vm_id=spec.vm_id, op="boot"
        )

    async def processes(self, vms_dir: Path) -> dict[str, int]:
        """The QEMUs whose files live under vms_dir (this daemon's), by VM id: read from
        their command lines, so another daemon's or a test's QEMUs are never counted."""
        found: dict[str, int] = {}
        for pid, pidfile in processes_with_arg(b"-pidfile"):
            if pidfile.name == PID_FILE and pidfile.parent.parent == vms_dir:
                vm_id = pidfile.parent.name
                if _is_ours(pid, vm_id):
                    found[vm_id] = pid
        return found

    async def alive(self, vm_id: str, vm_dir: Path) -> int | None:
        pid = _read_pid(vm_dir)
        return pid if pid is not None and _is_ours(pid, vm_id) else None

    async def stop(self, vm_id: str, vm_dir: Path, timeout: float) -> None:
        pid = await self.alive(vm_id, vm_dir)
        if pid is None:
            await self._forget(vm_id, vm_dir)
            return
        try:
            await self._end_restore(vm_id)  # QEMU's monitor serves one client at a time
            await qmp_execute(self.sockets(vm_dir) / QMP_SOCKET, "system_powerdown")
        except VMMError as exc:
            log.warning("acpi power-off not delivered, killing", vm_id=vm_id, error=str(exc))
        if not await _wait_gone(pid, vm_id, timeout):
            log.warning("guest ignored power-off, killing", vm_id=vm_id, timeout=timeout)
        await self.kill(vm_id, vm_dir)

    async def kill(self, vm_id: str, vm_dir: Path) -> None:
        await self._end_restore(vm_id)
        pid = await self.alive(vm_id, vm_dir)
        if pid is not None:
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
            if not await _wait_gone(pid, vm_id, 10):
                raise VMMError(f"qemu pid {pid} survived SIGKILL", vm_id=vm_id, op="kill")
            _reap(pid)
        await self._forget(vm_id, vm_dir)

    async def _control(self, vm_id: str, vm_dir: Path) -> QMPSession:
        """A QMP connection to the VM's QEMU, for the caller to close: the one its restore
        kept open, or a new one."""
        held = self._restoring.pop(vm_id, None)
        return held or await open_session(self.sockets(vm_dir) / QMP_SOCKET)

    async def _end_restore(self, vm_id: str) -> None:
        session = self._restoring.pop(vm_id, None)
        if session is not None:
            await session.close()

    def _close_output(self, vm_id: str) -> None:
        out = self._output.pop(vm_id, None)
        if out is not None:
            os.close(out)

    def _last_words(self, vm_id: str, vm_dir: Path) -> str:
        """What an incoming QEMU printed since it started (kept in qemu.log too)."""
        out = self._output.pop(vm_id, None)
        if out is None:
            return ""
        try:
            said = drain(out)
        finally:
            os.close(out)
        with (vm_dir / QEMU_LOG).open("ab") as qlog:
            qlog.write(said)
        prefix = f"{Path(self.qemu_bin).name}: "  # on each of its lines
        lines = said.decode(errors="replace").strip().splitlines()[-3:]
        return " | ".join(line.strip().removeprefix(prefix) for line in lines)

    async def _forget(self, vm_id: str, vm_dir: Path) -> None:
        await self._end_restore(vm_id)
        self._incoming.pop(vm_id, None)
        self._close_output(vm_id)
        (vm_dir / PID_FILE).unlink(missing_ok=True)
        shutil.rmtree(self.sockets(vm_dir), ignore_errors=True)
        if self.cgroups is not None:
            try:
                await asyncio.to_thread(self.cgroups.remove, vm_id)
            except CgroupError as exc:  # the next start-up's sweep retries
                log.warning("vm cgroup left behind", vm_id=vm_id, reason=str(exc))

    async def settle(self, running: list[RunningVM]) -> None:
        if self.cgroups is None:
            return
        for vm in running:
            pid = await self.alive(vm.vm_id, vm.vm_dir)
            if pid is None:
                continue
            limits = self._limits(vm.vcpu_count, vm.mem_mib)
            try:
                moved = await asyncio.to_thread(self.cgroups.adopt, vm.vm_id, pid, limits)
            except CgroupError as exc:
                log.warning("running vm keeps its old limits", vm_id=vm.vm_id, reason=str(exc))
                continue
            if moved:  # started by a hatchd without cgroups
                log.warning("running vm moved into its cgroup", vm_id=vm.vm_id, pid=pid)
        keep = {vm.vm_id for vm in running}
        removed, busy = await asyncio.to_thread(self.cgroups.sweep, keep)
        if removed:
            log.info("removed cgroups of vms that are gone", vms=removed)
        if busy:
            log.warning("cgroups of unknown vms still hold processes, left alone", vms=busy)

    async def snapshot(self, vm_id: str, vm_dir: Path, state_file: Path) -> None:
        """With x-ignore-shared the file-backed RAM is skipped: only device state (about
        0.1 MB) is written. `stop` drains and flushes the disks first, so they match. RAM
        mapped privately (a fork's child) is not skipped: it goes into the state file."""
        await self.capture(vm_id, vm_dir, state_file, op="snapshot")
        await self.kill(vm_id, vm_dir)

    async def capture(
        self,
        vm_id: str,
        vm_dir: Path,
        state_file: Path,
        meanwhile: Callable[[], Awaitable[None]] | None = None,
        op: str = "capture",
    ) -> None:
        if await self.alive(vm_id, vm_dir) is None:
            raise VMMNotRunning(f"no running qemu to {op}", vm_id=vm_id, op=op)
        state_file.unlink(missing_ok=True)
        await self._end_restore(vm_id)
        async with qmp_session(self.sockets(vm_dir) / QMP_SOCKET) as qmp:
            # `stop` returns with the vCPUs stopped and the disks drained and flushed, and a
            # stopped VM's devices neither receive nor write guest memory: the files are quiet
            # from here on, and may be copied while the device state is written.
            await qmp.execute("stop")
            copying = asyncio.create_task(meanwhile()) if meanwhile is not None else None
            try:
                await qmp.execute("migrate-set-capabilities", IGNORE_SHARED)
                await _pass_file(qmp, state_file, os.O_WRONLY | os.O_CREAT | os.O_EXCL)
                await qmp.execute("migrate", {"uri": f"fd:{STATE_FD}"})
                await qmp.wait_migration(MIGRATION_TIMEOUT)
            except BaseException:
                if copying is not None:
                    await asyncio.gather(copying, return_exceptions=True)
                raise
            if copying is not None:
                await copying

    async def start_incoming(self, spec: BootSpec) -> bool:
        """QEMU -incoming touches no guest RAM before the state is loaded (its ROMs are not
        copied in while it waits), so the memory file may be filled after it mapped it."""
        if spec.mem_file is None or not spec.mem_file.exists() or not spec.disk.exists():
            raise VMMFilesMissing("memory file or disk is missing", vm_id=spec.vm_id, op="restore")
        pid, qmp = await self._start(dataclasses.replace(spec, incoming=True))
        self._restoring[spec.vm_id] = qmp
        self._incoming[spec.vm_id] = _Ahead(
            pid, dataclasses.replace(spec, incoming=False), _identities(spec)
        )
        return True

    async def discard_incoming(self, vm_id: str, vm_dir: Path) -> bool:
        ahead = self._incoming.pop(vm_id, None)  # claimed here: restore() can no longer use it
        if ahead is None:
            return False
        await self.kill(vm_id, vm_dir)
        return True

    async def restore(self, spec: BootSpec, state_file: Path) -> int:
        if spec.mem_file is None or not spec.mem_file.exists() or not state_file.exists():
            if spec.vm_id in self._incoming:  # started ahead by start_incoming()
                await self.kill(spec.vm_id, spec.vm_dir)
            raise VMMFilesMissing(
                "memory or device state file is missing", vm_id=spec.vm_id, op="restore"
            )
        # One QMP connection from here until resume: the state is loaded as soon as QEMU is up
        # (migrate-incoming refuses a QEMU not waiting for one), and `cont` needs no new one.
        ahead = self._incoming.pop(spec.vm_id, None)
        qmp = self._restoring.get(spec.vm_id)
        pid = await self._usable_ahead(spec, ahead) if qmp is not None else None
        if pid is None or qmp is None:
            pid, qmp = await self._start(dataclasses.replace(spec, incoming=True))
            self._restoring[spec.vm_id] = qmp
        try:
            await qmp.execute("migrate-set-capabilities", IGNORE_SHARED)
            await _pass_file(qmp, state_file, os.O_RDONLY)
            await qmp.migrate_incoming(f"fd:{STATE_FD}", MIGRATION_TIMEOUT)
        except VMMError as exc:
            said = self._last_words(spec.vm_id, spec.vm_dir)
            await self.kill(spec.vm_id, spec.vm_dir)
            if said:
                raise type(exc)(f"{exc}: qemu said: {said}") from None
            raise
        self._close_output(spec.vm_id)
        return pid

    async def _usable_ahead(self, spec: BootSpec, ahead: _Ahead | None) -> int | None:
        """The pid of the QEMU start_incoming() started for this restore, if it may load
        the state: still alive, started for this very spec, and mapping the files that are
        at its paths now. A file replaced since (a copy made for a store or a fork still
        reading the old one) must never be written by the old mapping. Else it is ended."""
        if ahead is None:
            return None
        if ahead.spec == dataclasses.replace(spec, incoming=False) and _is_ours(
            ahead.pid, spec.vm_id
        ):
            try:
                same = _identities(spec) == ahead.files
            except FileNotFoundError:
                same = False
            if same:
                return ahead.pid
        log.info("vmm started ahead does not fit the restore, starting afresh", vm_id=spec.vm_id)
        await self.kill(spec.vm_id, spec.vm_dir)
        return None

    async def resume_if_paused(self, vm_id: str, vm_dir: Path) -> bool:
        """After an interrupted operation: let a guest left paused run on (a snapshot that did
        not finish, a boot or restore not yet let run). True if it runs."""
        if await self.alive(vm_id, vm_dir) is None:
            return False
        qmp = await self._control(vm_id, vm_dir)
        try:
            status = (await qmp.execute("query-status")).get("status")
            if status in ("paused", "postmigrate", "finish-migrate", "prelaunch"):
                await qmp.execute("cont")
                status = (await qmp.execute("query-status")).get("status")
        finally:
            await qmp.close()
        return status == "running"

    async def resume(self, vm_id: str, vm_dir: Path) -> None:
        qmp = await self._control(vm_id, vm_dir)
        try:
            await qmp.execute("cont")
            status = (await qmp.execute("query-status")).get("status")
        finally:
            await qmp.close()
        if status != "running":
            raise VMMError(f"the vm is {status} after cont, not running", vm_id=vm_id, op="resume")

    async def wait_exit(self, vm_id: str, vm_dir: Path) -> ExitInfo:
        pid = await self.alive(vm_id, vm_dir)
        if pid is None:
            return ExitInfo(at=datetime.now(UTC), reason=None)
        return await watch_process(pid, vm_id, self.sockets(vm_dir) / EVENTS_SOCKET)


@dataclasses.dataclass(frozen=True)
class _Ahead:
    """A QEMU started by start_incoming(), waiting for its state."""

    pid: int
    spec: BootSpec  # the restore's, as start_incoming() was given it
    files: tuple[tuple[int, int], ...]  # (device, inode) of its memory file and disk


def _identities(spec: BootSpec) -> tuple[tuple[int, int], ...]:
    """Which files the spec's paths name now."""
    paths = [spec.disk] if spec.mem_file is None else [spec.mem_file, spec.disk]
    return tuple((st.st_dev, st.st_ino) for st in (p.stat() for p in paths))


def _reap(pid: int) -> None:
    """Collect the exit status of a QEMU that is hatchd's child (one it started, or one whose
    parent died while hatchd was its subreaper), so no zombie is left; its watch, if any, may
    have done so already."""
    with contextlib.suppress(ChildProcessError):
        os.waitpid(pid, os.WNOHANG)


def _listen(path: Path) -> socket.socket:
    """A Unix stream socket listening at path (replacing a stale one), private to root."""
    path.unlink(missing_ok=True)
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        listener.bind(str(path))
        path.chmod(0o600)
        listener.listen(8)
    except OSError:
        listener.close()
        raise
    return listener


async def _pass_file(qmp: QMPSession, path: Path, flags: int) -> None:
    """QEMU gets path open with flags as the migration's file (a new one is private)."""
    try:
        fd = os.open(path, flags | os.O_CLOEXEC, 0o600)
    except OSError as exc:
        raise VMMError(f"cannot open the device state {path}: {exc.strerror}") from None
    try:
        await qmp.pass_fd(fd, STATE_FD)
    finally:
        os.close(fd)


def _make_private_file(path: Path) -> None:
    os.close(os.open(path, os.O_WRONLY | os.O_CREAT, 0o600))
    path.chmod(0o600)


def _tail(path: Path, lines: int = 5) -> str:
    try:
        text = path.read_text(errors="replace").strip().splitlines()[-lines:]
    except OSError:
        return "(no qemu log)"
    return " | ".join(text) or "(qemu printed nothing)"
