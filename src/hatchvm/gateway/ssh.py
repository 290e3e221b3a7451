"""The SSH gateway: each networked VM's ssh_port on the host is piped to the guest's port 22.

A connection to a sleeping VM wakes it first (the same shared wake as the proxy). Sources
outside HATCH_SSH_ALLOWED_CIDR are closed at once. Listeners follow VMs as they are created and
deleted; a VM that is asleep keeps its listener, so the next connection can wake it.
"""

from __future__ import annotations

import asyncio
import contextlib
import ipaddress
import time

import structlog

from hatchvm.config import Settings
from hatchvm.core.activity import Activity
from hatchvm.core.states import State
from hatchvm.core.vms import VMService
from hatchvm.core.wake import WakeService, first_connection
from hatchvm.db import repo
from hatchvm.db.models import VM
from hatchvm.errors import HatchError

log = structlog.get_logger("hatchvm.gateway")

GUEST_SSH_PORT = 22
BUFFER = 64 << 10


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
        self, settings: Settings, vms: VMService, wake: WakeService, activity: Activity
    ) -> None:
        self._s = settings
        self.vms = vms
        self.wake = wake
        self.activity = activity
        self._allowed = settings.ssh_allowed_networks
        self._servers: dict[str, asyncio.Server] = {}
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
        if vm.ssh_port is None or vm.id in self._servers or vm.state == State.ERROR:
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

    def _allowed_peer(self, writer: asyncio.StreamWriter) -> str | None:
        peer = writer.get_extra_info("peername")
        host = peer[0] if peer else ""
        try:
            address = ipaddress.ip_address(host)
        except ValueError:
            return None
        if address.version == 6 and address.ipv4_mapped:
            address = address.ipv4_mapped
        return host if any(address in net for net in self._allowed) else None

    async def _serve(
        self, user_id: str, vm_id: str, reader: asyncio.StreamReader, writer: asyncio.StreamWriter
    ) -> None:
        peer = self._allowed_peer(writer)
        if peer is None:
            log.warning(
                "ssh connection refused", vm_id=vm_id, peer=writer.get_extra_info("peername")
            )
            writer.close()
            return
        try:
            with self.activity.connection(vm_id):
                guest = await self._awake_guest(user_id, vm_id)
                if guest is None:
                    return
                up_reader, up_writer = guest
                await asyncio.gather(_pipe(reader, up_writer), _pipe(up_reader, writer))
                up_writer.close()
        except (ConnectionError, OSError) as exc:
            log.info("ssh connection ended", vm_id=vm_id, reason=str(exc))
        finally:
            writer.close()

    async def _awake_guest(
        self, user_id: str, vm_id: str
    ) -> tuple[asyncio.StreamReader, asyncio.StreamWriter] | None:
        """A connection to the guest's SSH server, waking the VM first if it sleeps."""
        timeout = self._s.proxy_wake_timeout
        deadline = time.monotonic() + timeout
        try:
            vm = await self.vms.get(user_id, vm_id)
            vm = await asyncio.wait_for(self.wake.ensure_running(vm), timeout)
        except (HatchError, TimeoutError) as exc:
            log.warning("ssh wake failed", vm_id=vm_id, reason=str(exc) or "timeout")
            return None
        guest = vm.guest_ip
        connection = None
        if guest:
            connection = await first_connection(
                lambda: asyncio.open_connection(guest, GUEST_SSH_PORT), deadline
            )
        if connection is None:
            log.warning("guest ssh port did not open", vm_id=vm_id)
        return connection
