"""The SSH gateway: each networked VM's ssh_port on the host is piped to the guest's port 22.

A connection to a sleeping VM wakes it first (the same shared wake as the proxy), but only once
the client has said it speaks SSH: its identification line (`SSH-2.0-...`, RFC 4253 4.2), which
an SSH client sends as soon as it connects, must arrive within HATCH_SSH_BANNER_TIMEOUT and 255
bytes. So a bare TCP connect or a port scan wakes nothing. The line (and whatever came with it)
is then forwarded to the guest. Wakes are rate-limited per source address (a token bucket:
HATCH_SSH_WAKE_BURST, HATCH_SSH_WAKES_PER_MINUTE). Sources outside HATCH_SSH_ALLOWED_CIDR are
closed at once. Refusals are logged once per kind and minute, with a count.

Listeners follow VMs as they are created and deleted; a VM that is asleep keeps its listener,
so the next connection can wake it.
"""

from __future__ import annotations

import asyncio
import contextlib
import time

import structlog

from hatchvm.clients import IPAddress, address_key, parse_address
from hatchvm.config import Settings
from hatchvm.core.activity import Activity
from hatchvm.core.states import State
from hatchvm.core.vms import VMService
from hatchvm.core.wake import WakeService, first_connection
from hatchvm.db import repo
from hatchvm.db.models import VM
from hatchvm.errors import HatchError
from hatchvm.logsummary import RepeatLog
from hatchvm.metrics import Metrics
from hatchvm.ratelimit import TokenBuckets

log = structlog.get_logger("hatchvm.gateway")

GUEST_SSH_PORT = 22
BUFFER = 64 << 10
MAX_IDENTIFICATION = 255  # bytes of the identification line, CR LF included (RFC 4253 4.2)
VERSIONS = (b"SSH-2.0-", b"SSH-1.99-")  # 1.99: a server-side alias of 2.0, still seen


async def read_identification(reader: asyncio.StreamReader, timeout: float) -> bytes | None:
    """The client's identification line and whatever came with it; None when the client sends
    anything else, more than 255 bytes without a line end, or nothing within timeout."""
    data = b""
    try:
        async with asyncio.timeout(timeout):
            while b"\n" not in data:
                if len(data) >= MAX_IDENTIFICATION or not _may_become_ssh(data):
                    return None
                piece = await reader.read(MAX_IDENTIFICATION - len(data))
                if not piece:
                    return None
                data += piece
    except TimeoutError:
        return None
    line = data.split(b"\n", 1)[0]
    return data if line.startswith(VERSIONS) and len(line) < MAX_IDENTIFICATION else None


def _may_become_ssh(data: bytes) -> bool:
    """Could data still turn into an identification line? (Garbage is refused at once.)"""
    return any(v.startswith(data[: len(v)]) or data.startswith(v) for v in VERSIONS)


async def _pipe(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    try:
        while data := await reader.read(BUFFER):
            writer.write(data)
            await writer.drain()
        if writer.can_write_eof():
            writer.write_eof()  # half-close: the other direction may still be talking
    except (ConnectionError, OSError):
        writer.close()


class SSHGateway:
    def __init__(
        self,
        settings: Settings,
        vms: VMService,
        wake: WakeService,
        activity: Activity,
        guest_port: int = GUEST_SSH_PORT,
        metrics: Metrics | None = None,
    ) -> None:
        self._s = settings
        self.metrics = metrics or Metrics()
        self.vms = vms
        self.wake = wake
        self.activity = activity
        self.guest_port = guest_port
        self._allowed = settings.ssh_allowed_networks
        self._servers: dict[str, asyncio.Server] = {}
        self._wakes = TokenBuckets(settings.ssh_wakes_per_minute / 60, settings.ssh_wake_burst)
        self.refusals = RepeatLog(log, "ssh connections refused", interval=60.0)
        vms.create_hooks.append(self.follow)
        vms.delete_hooks.append(self.forget)

    async def start(self) -> None:
        async with self.vms.sessions() as session:
            vms = await repo.list_vms(session)
        for vm in vms:
            await self.follow(vm)

    async def close(self) -> None:
        for vm_id in list(self._servers):
            await self._close(vm_id)

    async def follow(self, vm: VM) -> None:
        # A VM in error keeps its port while it keeps its disk: it may be started again.
        if vm.ssh_port is None or vm.id in self._servers:
            return
        try:
            server = await asyncio.start_server(
                lambda r, w, vm_id=vm.id: self._serve(vm.user_id, vm_id, r, w),
                self._s.ssh_host,
                vm.ssh_port,
                reuse_address=True,
            )
        except OSError as exc:
            log.error("ssh port unavailable", vm_id=vm.id, port=vm.ssh_port, reason=exc.strerror)
            return
        self._servers[vm.id] = server
        log.info("ssh gateway listening", vm_id=vm.id, port=vm.ssh_port)

    async def forget(self, vm: VM) -> None:
        await self._close(vm.id)

    async def _close(self, vm_id: str) -> None:
        server = self._servers.pop(vm_id, None)
        if server is not None:
            server.close()
            with contextlib.suppress(Exception):
                await server.wait_closed()

    def _admits(self, address: IPAddress) -> bool:
        return any(address in net for net in self._allowed)

    async def _serve(
        self, user_id: str, vm_id: str, reader: asyncio.StreamReader, writer: asyncio.StreamWriter
    ) -> None:
        peer = writer.get_extra_info("peername")
        source = str(peer[0]) if peer else ""
        address = parse_address(source)
        self.metrics.ssh_connected()
        try:
            if address is None or not self._admits(address):
                self.metrics.ssh_refused("address_not_allowed")
                self.refusals.note("outside HATCH_SSH_ALLOWED_CIDR", source=source, vm_id=vm_id)
                return
            hello = await read_identification(reader, self._s.ssh_banner_timeout)
            if hello is None:  # a port scan, a health check, another protocol: wake nothing
                self.metrics.ssh_refused("no_identification")
                self.refusals.note("no SSH identification line", source=source, vm_id=vm_id)
                return
            with self.activity.connection(vm_id):
                guest = await self._awake_guest(user_id, vm_id, address_key(address), source)
                if guest is None:
                    return
                up_reader, up_writer = guest
                up_writer.write(hello)
                await asyncio.gather(_pipe(reader, up_writer), _pipe(up_reader, writer))
                up_writer.close()
        except (ConnectionError, OSError) as exc:
            log.info("ssh connection ended", vm_id=vm_id, reason=str(exc))
        finally:
            writer.close()

    async def _awake_guest(
        self, user_id: str, vm_id: str, client: str, source: str
    ) -> tuple[asyncio.StreamReader, asyncio.StreamWriter] | None:
        """A connection to the guest's SSH server, waking the VM first if it sleeps (if the
        client's address has a wake left in its bucket)."""
        timeout = self._s.proxy_wake_timeout
        deadline = time.monotonic() + timeout
        try:
            vm = await self.vms.get(user_id, vm_id)
            if vm.state != State.RUNNING and not self._wakes.take(client):
                self.metrics.ssh_refused("wake_rate_limited")
                self.refusals.note("wake rate limit", source=source, vm_id=vm_id)
                return None
            woken = await asyncio.wait_for(self.wake.wake_up(vm, "ssh"), timeout)
        except (HatchError, TimeoutError) as exc:
            reason = getattr(exc, "message", "") or "timeout"
            self.metrics.ssh_refused("wake_failed")
            self.refusals.note("wake failed", source=source, vm_id=vm_id, reason=reason)
            return None
        woke = time.monotonic()
        guest = woken.vm.guest_ip
        connection = None
        if guest:
            port = self.guest_port
            connection = await first_connection(
                lambda: asyncio.open_connection(guest, port), deadline
            )
        if connection is None:
            self.metrics.ssh_refused("port_closed")
            log.warning("guest ssh port did not open", vm_id=vm_id)
        elif woken.how is not None:
            self.metrics.wake_stage("port_wait", woken.how, "ssh", time.monotonic() - woke)
        return connection
