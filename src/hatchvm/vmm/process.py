"""Watching one VMM process end: a pidfd says the moment it is gone (no polling), QEMU's
event monitor says why, and when hatchd is the process's reaper (PR_SET_CHILD_SUBREAPER, see
become_subreaper) waitid gives its exit code or signal."""

from __future__ import annotations

import asyncio
import contextlib
import ctypes
import fcntl
import json
import os
import signal
from collections.abc import Iterator
from datetime import UTC, datetime
from pathlib import Path

import structlog

from hatchvm.vmm.base import ExitInfo

log = structlog.get_logger("hatchvm.vmm")

_PR_SET_CHILD_SUBREAPER = 36
EVENT_LINE_LIMIT = 64 << 10  # QMP event lines are small; a longer one is not read
DRAIN_TIMEOUT = 2.0  # after the process is gone, its event socket reaches EOF at once


def processes_with_arg(flag: bytes) -> Iterator[tuple[int, Path]]:
    """(pid, the path given after `flag`) for every process whose command line has the flag:
    how a driver finds its VMMs (QEMU's -pidfile, Firecracker's --api-sock) without trusting
    pid files alone."""
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            args = (entry / "cmdline").read_bytes().split(b"\0")
        except OSError:
            continue
        if flag in args and args.index(flag) + 1 < len(args):
            yield int(entry.name), Path(os.fsdecode(args[args.index(flag) + 1]))


def become_subreaper() -> bool:
    """Orphaned descendants (a VMM whose launcher ended before it) become hatchd's children,
    not init's, so hatchd can read their exit status. True if the kernel agreed."""
    libc = ctypes.CDLL(None, use_errno=True)
    return libc.prctl(_PR_SET_CHILD_SUBREAPER, 1, 0, 0, 0) == 0


async def watch_process(pid: int, vm_id: str, events_socket: Path) -> ExitInfo:
    """Return once process pid has ended, with what is known about how."""
    try:
        pidfd = os.pidfd_open(pid)
    except ProcessLookupError:
        return ExitInfo(at=datetime.now(UTC))
    reasons: list[str] = []
    listener = asyncio.create_task(_listen(events_socket, reasons), name=f"qmp-events-{vm_id}")
    try:
        await _readable(pidfd)
        at = datetime.now(UTC)
        code, sig = _reap(pidfd)
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(asyncio.shield(listener), DRAIN_TIMEOUT)
    finally:
        listener.cancel()
        os.close(pidfd)
    return ExitInfo(at=at, reason=reasons[-1] if reasons else None, exit_code=code, signal=sig)


async def _readable(fd: int) -> None:
    loop = asyncio.get_running_loop()
    done = loop.create_future()
    loop.add_reader(fd, lambda: done.done() or done.set_result(None))
    try:
        await done
    finally:
        loop.remove_reader(fd)


def _reap(pidfd: int) -> tuple[int | None, int | None]:
    """(exit code, signal) if the process was hatchd's child, else (None, None)."""
    try:
        info = os.waitid(os.P_PIDFD, pidfd, os.WEXITED | os.WNOHANG)
    except ChildProcessError:
        return None, None  # not ours to reap (hatchd restarted since it started)
    if info is None:
        return None, None
    if info.si_code == os.CLD_EXITED:
        return info.si_status, None
    return None, info.si_status


async def _listen(socket: Path, reasons: list[str]) -> None:
    """Collect the reasons of SHUTDOWN events until the monitor closes (the process ended)."""
    try:
        reader, writer = await asyncio.open_unix_connection(str(socket), limit=EVENT_LINE_LIMIT)
    except OSError as exc:
        log.debug("no qmp event monitor", socket=str(socket), reason=str(exc))
        return
    try:
        writer.write(b'{"execute": "qmp_capabilities"}\n')
        while line := await reader.readline():
            try:
                message = json.loads(line)
            except ValueError:
                continue
            if isinstance(message, dict) and message.get("event") in ("SHUTDOWN", "GUEST_PANICKED"):
                data = message.get("data") or {}
                reason = data.get("reason") if message["event"] == "SHUTDOWN" else "guest-panic"
                if isinstance(reason, str):
                    reasons.append(reason)
    except (OSError, asyncio.LimitOverrunError, ValueError):
        pass
    finally:
        writer.close()


async def process_ended(pid: int, timeout: float) -> bool:
    """True once process pid has ended (a pidfd: no polling), False if it still runs after
    timeout seconds. It is not reaped: its watch (wait_process) reads how it ended."""
    try:
        pidfd = os.pidfd_open(pid)
    except ProcessLookupError:
        return True
    try:
        await asyncio.wait_for(_readable(pidfd), timeout)
        return True
    except TimeoutError:
        return False
    finally:
        os.close(pidfd)


async def wait_process(pid: int) -> ExitInfo:
    """Return once process pid has ended, with its exit code or signal when hatchd is its
    reaper (no reason: VMMs without an event channel say nothing more)."""
    try:
        pidfd = os.pidfd_open(pid)
    except ProcessLookupError:
        return ExitInfo(at=datetime.now(UTC))
    try:
        await _readable(pidfd)
        at = datetime.now(UTC)
        code, sig = _reap(pidfd)
    finally:
        os.close(pidfd)
    return ExitInfo(at=at, exit_code=code, signal=sig)


def spawn(
    cmd: list[str], output: int, env: dict[str, str], fds: dict[int, int] | None = None
) -> int:
    """Start cmd (looked up in PATH) with environment env in a session of its own, stdin from
    /dev/null, stdout and stderr to the descriptor output, and each descriptor fds[n] as its
    descriptor n; its pid.
    posix_spawn: no copy of hatchd is made. Signals hatchd ignores (SIGPIPE) stay ignored:
    a VMM whose output leads nowhere must not die of writing it."""
    actions: list[tuple[int, ...] | tuple[int, int, str, int, int]] = [
        (os.POSIX_SPAWN_OPEN, 0, os.devnull, os.O_RDONLY, 0),
        (os.POSIX_SPAWN_DUP2, output, 1),
        (os.POSIX_SPAWN_DUP2, output, 2),
    ]
    # dup2 clears close-on-exec on the copy; the originals are all above 9, never a target.
    actions += [(os.POSIX_SPAWN_DUP2, fd, n) for n, fd in (fds or {}).items()]
    return os.posix_spawnp(cmd[0], cmd, env, file_actions=actions, setsid=True)


def high_fd(fd: int) -> int:
    """A close-on-exec copy of fd numbered 10 or above: a safe source for spawn's dup2s."""
    return fcntl.fcntl(fd, fcntl.F_DUPFD_CLOEXEC, 10)


def drain(fd: int) -> bytes:
    """What can be read from a non-blocking descriptor now (up to its end, if it has one)."""
    chunks: list[bytes] = []
    while True:
        try:
            chunk = os.read(fd, 65536)
        except BlockingIOError:
            break
        if not chunk:
            break
        chunks.append(chunk)
    return b"".join(chunks)


async def wait_child(pid: int, timeout: float) -> int:
    """The exit code of hatchd's child pid (a signal's number negated), once it has ended; it
    is killed and -1 returned if it still runs after timeout seconds."""
    pidfd = os.pidfd_open(pid)
    try:
        try:
            await asyncio.wait_for(_readable(pidfd), timeout)
        except TimeoutError:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
            await _readable(pidfd)
            _reap(pidfd)
            return -1
        code, sig = _reap(pidfd)
    finally:
        os.close(pidfd)
    if code is not None:
        return code
    return -sig if sig else -1
