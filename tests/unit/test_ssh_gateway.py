"""The SSH gateway in-process: a VM's listener on loopback, a scripted "guest sshd" behind it,
core stubbed. A connection wakes the VM only once it has sent an SSH identification line (a
port scan, a health check or another protocol wakes nothing), that line reaches the guest
first, wakes are rate-limited per source address, and refusals do not flood the log."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import structlog
from structlog.testing import capture_logs

from hatchvm.config import Settings
from hatchvm.core.activity import Activity
from hatchvm.core.states import State
from hatchvm.core.wake import Woken
from hatchvm.gateway.ssh import SSHGateway
from tests.support.daemon import free_port
from tests.unit.test_proxy_protocol import eventually

HELLO = b"SSH-2.0-OpenSSH_9.2p1 Debian-2\r\n"


@dataclass
class StubVM:
    ssh_port: int
    id: str = "vm_ssh"
    user_id: str = "alice"
    state: str = State.SNAPSHOTTED.value
    guest_ip: str = "127.0.0.1"


class StubVMs:
    def __init__(self, vm: StubVM) -> None:
        self.vm = vm
        self.create_hooks: list[Any] = []
        self.delete_hooks: list[Any] = []

    async def get(self, user_id: str, vm_id: str) -> StubVM:
        return self.vm

    async def touch_activity(self, vm_id: str) -> None:
        pass


class StubWake:
    def __init__(self) -> None:
        self.wakes = 0

    async def wake_up(self, vm: StubVM, trigger: str) -> Woken:
        if vm.state == State.RUNNING.value:
            return Woken(vm, None)  # type: ignore[arg-type]
        self.wakes += 1
        vm.state = State.RUNNING.value
        return Woken(vm, "restore")  # type: ignore[arg-type]


class GuestSSHD:
    """Says its own banner, records what the client sent first."""

    def __init__(self) -> None:
        self.received: list[bytes] = []

    async def serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        writer.write(b"SSH-2.0-dropbear_2022.83\r\n")
        self.received.append(await reader.read(1024))
        writer.close()


@dataclass
class Rig:
    port: int
    vm: StubVM
    wake: StubWake
    guest: GuestSSHD
    gateway: SSHGateway
    guest_port: int


@pytest.fixture
async def rig(tmp_path: Path) -> AsyncIterator[Rig]:
    guest = GuestSSHD()
    server = await asyncio.start_server(guest.serve, "127.0.0.1", 0)
    settings = Settings(
        data_dir=tmp_path,
        ssh_host="127.0.0.1",
        ssh_allowed_cidr="127.0.0.0/8",
        ssh_banner_timeout=0.3,
        ssh_wake_burst=2,
        ssh_wakes_per_minute=1,
    )
    vm = StubVM(ssh_port=free_port())
    vms, wake = StubVMs(vm), StubWake()
    gateway = SSHGateway(
        settings,
        vms,  # type: ignore[arg-type]
        wake,  # type: ignore[arg-type]
        Activity(vms),  # type: ignore[arg-type]
        guest_port=server.sockets[0].getsockname()[1],
    )
    await gateway.follow(vm)  # type: ignore[arg-type]
    yield Rig(vm.ssh_port, vm, wake, guest, gateway, server.sockets[0].getsockname()[1])
    await gateway.close()
    server.close()


async def session(port: int, send: bytes, source: str = "127.0.0.1") -> bytes:
    """Connect, send, and read whatever comes back until the gateway closes."""
    reader, writer = await asyncio.open_connection("127.0.0.1", port, local_addr=(source, 0))
    if send:
        writer.write(send)
    try:
        return await asyncio.wait_for(reader.read(), 5)
    finally:
        writer.close()


async def test_only_an_ssh_client_wakes_the_vm(rig: Rig) -> None:
    _reader, writer = await asyncio.open_connection("127.0.0.1", rig.port)
    writer.close()  # a bare connect, as a port scan does
    assert await session(rig.port, b"") == b""  # silent until the wait ends
    assert await session(rig.port, b"GET / HTTP/1.1\r\nHost: x\r\n\r\n") == b""
    assert await session(rig.port, b"SSH-2.0-" + b"x" * 300) == b""  # no line end in 255
    assert await session(rig.port, b"SSH-2.0-nearly") == b""  # no line end in time
    assert rig.wake.wakes == 0 and rig.vm.state == State.SNAPSHOTTED.value

    answer = await session(rig.port, HELLO + b"\x00\x00\x01\x2ckexinit...")
    assert answer == b"SSH-2.0-dropbear_2022.83\r\n"  # the guest's banner came back
    assert rig.wake.wakes == 1
    assert rig.guest.received == [HELLO + b"\x00\x00\x01\x2ckexinit..."]  # the line first


async def test_wakes_are_rate_limited_per_source_address(rig: Rig) -> None:
    for _ in range(2):  # the burst
        rig.vm.state = State.SNAPSHOTTED.value
        assert await session(rig.port, HELLO) != b""
    assert rig.wake.wakes == 2
    rig.vm.state = State.SNAPSHOTTED.value
    assert await session(rig.port, HELLO) == b""  # the bucket is empty: no wake
    assert rig.wake.wakes == 2
    assert await session(rig.port, HELLO, source="127.0.0.2") != b""  # another address
    assert rig.wake.wakes == 3
    assert await session(rig.port, HELLO) != b""  # the VM runs now: nothing to wake
    assert rig.wake.wakes == 3


async def test_refusals_are_logged_once_per_kind_not_per_connection(rig: Rig) -> None:
    with capture_logs() as logs:
        for n in range(20):
            assert await session(rig.port, b"HELO\r\n", source=f"127.0.1.{n + 1}") == b""
    refusals = [e for e in logs if e["event"] == "ssh connections refused"]
    assert len(refusals) == 1 and refusals[0]["kind"] == "no SSH identification line"
    assert rig.wake.wakes == 0


async def test_repeat_log_summarises_each_interval() -> None:
    from hatchvm.logsummary import RepeatLog

    with capture_logs() as logs:
        summary = RepeatLog(structlog.get_logger(), "refused", interval=0.1)
        for n in range(20):
            summary.note("scan", source=f"10.0.0.{n % 5}")
        summary.note("other")
        await eventually(lambda: len(logs) >= 3, "the summary line")
    first, other, summed = logs[0], logs[1], logs[2]
    assert first["kind"] == "scan" and other["kind"] == "other"
    assert summed["kind"] == "scan" and summed["repeated"] == 19 and summed["sources"] == 5
    await eventually(lambda: not summary._windows, "a quiet interval to close the window")
    assert len(logs) == 3  # nothing repeated in it: no line for it


def test_token_bucket() -> None:
    from hatchvm.ratelimit import TokenBuckets

    buckets = TokenBuckets(rate=0.5, burst=2)
    assert [buckets.take("a", now=0.0) for _ in range(3)] == [True, True, False]
    assert buckets.take("b", now=0.0)
    assert not buckets.take("a", now=1.0)  # half a token back
    assert buckets.take("a", now=2.1)
    assert not buckets.take("a", now=2.2)


async def test_a_vm_in_error_keeps_its_listener_for_when_it_is_started_again(
    rig: Rig, tmp_path: Path
) -> None:
    """A daemon started while a VM is in error (its wakes kept failing; it has its disk and
    port) listens for it too: once its owner starts it, SSH reaches the guest again."""
    vm = StubVM(ssh_port=free_port(), id="vm_broken", state=State.ERROR.value)
    settings = Settings(data_dir=tmp_path, ssh_host="127.0.0.1", ssh_allowed_cidr="127.0.0.0/8")
    vms = StubVMs(vm)
    gateway = SSHGateway(
        settings,
        vms,  # type: ignore[arg-type]
        rig.wake,  # type: ignore[arg-type]
        Activity(vms),  # type: ignore[arg-type]
        guest_port=rig.guest_port,
    )
    await gateway.follow(vm)  # type: ignore[arg-type]
    try:
        vm.state = State.RUNNING.value  # POST /vms/{id}/start
        answer = await session(vm.ssh_port, HELLO)
        assert answer == b"SSH-2.0-dropbear_2022.83\r\n"
    finally:
        await gateway.close()
