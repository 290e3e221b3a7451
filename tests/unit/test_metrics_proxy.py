"""The proxy counts every request once, by status class and by who answered, and times the
stages of a request that woke its VM (the real Proxy; core stubbed: tests/unit/proxy_fakes.py)."""

from __future__ import annotations

import asyncio
import socket
import struct
from collections.abc import AsyncIterator
from pathlib import Path

import pytest
from prometheus_client import generate_latest

from hatchvm.config import Settings
from hatchvm.core.activity import Activity
from hatchvm.core.states import State
from hatchvm.core.wake import Woken
from hatchvm.metrics import Metrics
from hatchvm.proxy.server import Proxy
from tests.support.daemon import free_port
from tests.unit.proxy_fakes import FakeRoutes, FakeVM, FakeVMs
from tests.unit.test_metrics import value
from tests.unit.test_proxy_protocol import ScriptedUpstream, connect, eventually, get, read_response

DURATION = "hatch_proxy_request_duration_seconds"


class StubWake:
    """Wakes the fake VM as a restore would, once a test lets it."""

    def __init__(self) -> None:
        self.release = asyncio.Event()
        self.asked = 0

    async def wake_up(self, vm: FakeVM, trigger: str) -> Woken:
        self.asked += 1
        await self.release.wait()
        vm.state = State.RUNNING.value
        return Woken(vm, "restore")  # type: ignore[arg-type]


@pytest.fixture
async def rig(tmp_path: Path) -> AsyncIterator[tuple[int, Proxy, FakeVMs, StubWake, Metrics]]:
    upstream = ScriptedUpstream()
    server = await asyncio.start_server(upstream.serve, "127.0.0.1", 0)
    up_port = server.sockets[0].getsockname()[1]
    proxy_port = free_port()
    settings = Settings(data_dir=tmp_path, proxy_addr=f"127.0.0.1:{proxy_port}")
    vms, wake, metrics = FakeVMs(hot=False), StubWake(), Metrics()
    routes = FakeRoutes(up_port, "raw")
    proxy = Proxy(settings, vms, routes, wake, Activity(vms), metrics)  # type: ignore[arg-type]
    await proxy.start()
    yield proxy_port, proxy, vms, wake, metrics
    await proxy.close()
    server.close()


def text(metrics: Metrics) -> str:
    return generate_latest(metrics.registry).decode()


def count(metrics: Metrics, status_class: str, origin: str) -> float:
    found = value(text(metrics), f"{DURATION}_count", status_class=status_class, origin=origin)
    return found or 0.0


async def test_each_request_is_counted_once_by_class_and_origin(rig) -> None:
    port, _proxy, _vms, wake, metrics = rig
    wake.release.set()
    reader, writer = await connect(port)
    writer.write(get("/a") + get("/no-content") + get("/x", host="nobody.hatch.local"))
    assert [(await read_response(reader))[0] for _ in range(3)] == [200, 204, 404]
    await eventually(lambda: count(metrics, "4xx", "proxy") == 1, "the 404 to be counted")
    assert count(metrics, "2xx", "guest") == 2
    writer.write(b"NOT HTTP\r\n\r\n")
    assert (await read_response(reader))[0] == 400
    writer.close()
    await eventually(lambda: count(metrics, "4xx", "proxy") == 2, "the 400 to be counted")
    assert count(metrics, "2xx", "guest") == 2  # nothing counted twice
    assert value(text(metrics), f"{DURATION}_sum", status_class="2xx", origin="guest") > 0


async def test_a_request_that_woke_its_vm_times_its_stages(rig) -> None:
    port, _proxy, vms, wake, metrics = rig
    vms.vm.state = State.SNAPSHOTTED.value
    reader, writer = await connect(port)
    writer.write(get("/woken"))
    await eventually(lambda: wake.asked == 1, "the request to wait for the wake")
    wake.release.set()
    assert (await read_response(reader))[0] == 200
    writer.close()
    now = text(metrics)
    for stage in ("port_wait", "proxy"):
        labels = {"stage": stage, "how": "restore", "trigger": "proxy"}
        assert value(now, "hatch_wake_duration_seconds_count", **labels) == 1, stage
    assert count(metrics, "2xx", "guest") == 1


async def test_a_client_that_leaves_unanswered_is_counted(rig) -> None:
    port, _proxy, vms, wake, metrics = rig
    vms.vm.state = State.SNAPSHOTTED.value  # the wake never ends in this test
    _reader, writer = await connect(port)
    writer.write(get("/waiting"))
    await writer.drain()
    await eventually(lambda: wake.asked == 1, "the request to wait for the wake")
    # A reset, not a close: after a FIN the proxy would still answer what was asked.
    linger = struct.pack("ii", 1, 0)
    writer.get_extra_info("socket").setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, linger)
    writer.close()
    await eventually(lambda: count(metrics, "none", "proxy") == 1, "the gone client's count")
