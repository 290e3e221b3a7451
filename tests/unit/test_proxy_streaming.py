"""The proxy module on its own: a real aiohttp upstream on loopback stands in for the guest and
stubs stand in for core, so streaming, headers and WebSockets can be checked in depth (large
bodies, memory bounds) without a VM. The VM end to end is in tests/integration."""

from __future__ import annotations

import asyncio
import hashlib
import json
import os
import tracemalloc
from collections.abc import AsyncIterator
from pathlib import Path

import aiohttp
import pytest
from aiohttp import web

from hatchvm.config import Settings
from hatchvm.core.activity import Activity
from hatchvm.proxy.server import Proxy
from tests.support.daemon import free_port
from tests.unit.proxy_fakes import FakeRoutes, FakeVMs

MIB = 1 << 20


async def upstream_app() -> web.Application:
    async def upload(request: web.Request) -> web.Response:
        sha, size = hashlib.sha256(), 0
        async for chunk in request.content.iter_any():
            sha.update(chunk)
            size += len(chunk)
        return web.json_response({"bytes": size, "sha256": sha.hexdigest()})

    async def download(request: web.Request) -> web.StreamResponse:
        mib = int(request.query["mib"])
        response = web.StreamResponse()
        response.enable_chunked_encoding()
        await response.prepare(request)
        block = bytes(range(256)) * (MIB // 256)
        for _ in range(mib):
            await response.write(block)
        await response.write_eof()
        return response

    async def headers(request: web.Request) -> web.Response:
        return web.json_response(dict(request.headers), headers={"Connection": "close, X-Hop"})

    async def ws(request: web.Request) -> web.WebSocketResponse:
        sock = web.WebSocketResponse()
        await sock.prepare(request)
        async for msg in sock:
            if msg.type == aiohttp.WSMsgType.TEXT:
                await sock.send_str("echo:" + msg.data)
            elif msg.type == aiohttp.WSMsgType.BINARY:
                await sock.send_bytes(msg.data[::-1])
        return sock

    app = web.Application(client_max_size=0)
    app.router.add_post("/upload", upload)
    app.router.add_get("/download", download)
    app.router.add_get("/headers", headers)
    app.router.add_get("/ws", ws)
    return app


@pytest.fixture
async def stack(tmp_path: Path) -> AsyncIterator[tuple[str, FakeVMs]]:
    up_port, proxy_port = free_port(), free_port()
    runner = web.AppRunner(await upstream_app())
    await runner.setup()
    await web.TCPSite(runner, "127.0.0.1", up_port).start()
    settings = Settings(data_dir=tmp_path, proxy_addr=f"127.0.0.1:{proxy_port}")
    vms = FakeVMs(hot=False)
    proxy = Proxy(settings, vms, FakeRoutes(up_port, "app"), None, Activity(vms))  # type: ignore[arg-type]
    await proxy.start()
    yield f"http://127.0.0.1:{proxy_port}", vms
    await proxy.close()
    await runner.cleanup()


HOST = {"Host": "app.hatch.local"}


async def test_large_upload_streams_with_bounded_memory(stack) -> None:
    url, _vms = stack
    sent = hashlib.sha256()
    block = os.urandom(MIB)

    async def body() -> AsyncIterator[bytes]:
        for _ in range(128):
            sent.update(block)
            yield block

    tracemalloc.start()
    try:
        async with aiohttp.ClientSession() as client:
            async with client.post(url + "/upload", data=body(), headers=HOST) as response:
                result = await response.json()
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert result == {"bytes": 128 * MIB, "sha256": sent.hexdigest()}
    assert peak < 48 * MIB, f"proxy held {peak / MIB:.0f} MiB for a 128 MiB upload"


async def test_large_chunked_download_streams_with_bounded_memory(stack) -> None:
    url, _vms = stack
    tracemalloc.start()
    size = 0
    try:
        async with aiohttp.ClientSession() as client:
            async with client.get(url + "/download?mib=128", headers=HOST) as response:
                assert response.headers.get("Transfer-Encoding") == "chunked"
                async for chunk in response.content.iter_any():
                    size += len(chunk)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert size == 128 * MIB
    assert peak < 48 * MIB, f"proxy held {peak / MIB:.0f} MiB for a 128 MiB download"


async def test_forwarded_and_hop_by_hop_headers(stack) -> None:
    url, vms = stack
    async with aiohttp.ClientSession() as client:
        headers = {
            **HOST,
            "X-Forwarded-For": "203.0.113.9",  # a client's claims about itself: replaced
            "X-Forwarded-Proto": "https",
            "X-Forwarded-Host": "bank.example",
            "X-Forwarded-Port": "443",
            "Forwarded": "for=203.0.113.9",
            "Connection": "keep-alive, X-Secret",
            "X-Secret": "hop only",
            "Keep-Alive": "timeout=5",
            "X-Custom": "kept",
        }
        async with client.get(url + "/headers?q=1", headers=headers) as response:
            seen = {k.lower(): v for k, v in (await response.json()).items()}
            assert "x-hop" not in {k.lower() for k in response.headers}
    assert seen["x-forwarded-for"] == "127.0.0.1"
    assert seen["x-forwarded-proto"] == "http"
    assert seen["x-forwarded-host"] == "app.hatch.local"
    assert "x-forwarded-port" not in seen and "forwarded" not in seen
    assert seen["x-custom"] == "kept"
    assert "x-secret" not in seen and "keep-alive" not in seen
    await asyncio.sleep(0)
    assert vms.touched >= 1


async def test_many_hosts_on_one_keep_alive_connection(stack) -> None:
    url, _vms = stack
    connector = aiohttp.TCPConnector(limit=1)
    async with aiohttp.ClientSession(connector=connector) as client:
        for host, status in [("app.hatch.local", 200), ("other.hatch.local", 404)] * 3:
            async with client.get(url + "/headers", headers={"Host": host}) as response:
                assert response.status == status
                body = await response.json()
                if status == 404:
                    assert "no route" in body["error"]


async def test_websocket_echo(stack) -> None:
    url, _vms = stack
    async with aiohttp.ClientSession() as client:
        async with client.ws_connect(url + "/ws", headers=HOST) as sock:
            await sock.send_str("hello")
            assert (await sock.receive()).data == "echo:hello"
            await sock.send_bytes(b"\x01\x02\x03")
            assert (await sock.receive()).data == b"\x03\x02\x01"
            big = "x" * (2 * MIB)
            await sock.send_str(big)
            assert (await sock.receive()).data == "echo:" + big


async def test_unknown_host_is_json(stack) -> None:
    url, _vms = stack
    async with aiohttp.ClientSession() as client:
        async with client.get(url + "/", headers={"Host": "nope.hatch.local"}) as response:
            assert response.status == 404
            assert "no route" in json.loads(await response.text())["error"]
