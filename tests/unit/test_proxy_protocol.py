"""HTTP/1.1 details of the proxy, byte by byte: a raw client talks to the real Proxy, which
forwards to a scripted raw upstream on loopback (core is stubbed: the VM is always running, on
the in-memory hot path). Pipelining, HEAD, 1xx, HTTP/1.0, close-delimited bodies, connection
reuse and its failure modes, malformed requests."""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from hatchvm.config import Settings
from hatchvm.core.activity import Activity
from hatchvm.proxy.server import Proxy
from tests.support.daemon import free_port
from tests.unit.proxy_fakes import FakeRoutes, FakeVMs


async def eventually(condition: Callable[[], bool], what: str, timeout: float = 5.0) -> None:
    """Wait for condition, polling the event loop, up to timeout."""
    deadline = asyncio.get_running_loop().time() + timeout
    while not condition():
        assert asyncio.get_running_loop().time() < deadline, f"timed out waiting for {what}"
        await asyncio.sleep(0.005)


@dataclass
class ScriptedUpstream:
    """Answers by path; counts connections and records each request head it saw."""

    connections: int = 0
    heads: list[bytes] = field(default_factory=list)

    async def serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.connections += 1
        drop_next = False
        try:
            while True:
                head = await reader.readuntil(b"\r\n\r\n")
                if drop_next:  # this connection was kept alive by the proxy, then we forget it
                    return
                self.heads.append(head)
                lines = head.decode().split("\r\n")
                method, path, _version = lines[0].split(" ")
                headers = {
                    k.lower(): v.strip() for k, v in (x.split(":", 1) for x in lines[1:] if x)
                }
                body = b""
                if headers.get("expect") == "100-continue":
                    writer.write(b"HTTP/1.1 100 Continue\r\n\r\n")
                if "content-length" in headers:
                    body = await reader.readexactly(int(headers["content-length"]))
                elif headers.get("transfer-encoding") == "chunked":
                    body = await read_chunked(reader)
                if path == "/close-delimited":
                    writer.write(b"HTTP/1.1 200 OK\r\nConnection: close\r\n\r\nuntil the end")
                    await writer.drain()
                    return
                if path == "/no-content":
                    writer.write(b"HTTP/1.1 204 No Content\r\nX-Kind: empty\r\n\r\n")
                    continue
                if path == "/drop-next":
                    drop_next = True
                answer = json.dumps({"method": method, "path": path, "body": len(body)}).encode()
                writer.write(
                    b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\n"
                    b"Content-Length: %d\r\n\r\n" % len(answer)
                )
                if method != "HEAD":
                    writer.write(answer)
                await writer.drain()
        except (asyncio.IncompleteReadError, ConnectionError):
            pass
        finally:
            writer.close()


async def read_chunked(reader: asyncio.StreamReader) -> bytes:
    body = b""
    while True:
        size = int((await reader.readuntil(b"\r\n")).strip(), 16)
        data = await reader.readexactly(size + 2)
        if size == 0:
            return body
        body += data[:-2]


async def read_response(reader: asyncio.StreamReader, *, head: bool = False) -> tuple:
    """(status, lower-cased headers, body) of one response on a raw connection."""
    raw = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 10)
    lines = raw.decode().split("\r\n")
    status = int(lines[0].split(" ")[1])
    headers = {k.lower(): v.strip() for k, v in (x.split(":", 1) for x in lines[1:] if x)}
    if head or status in (100, 204, 304):
        return status, headers, b""
    if headers.get("transfer-encoding") == "chunked":
        return status, headers, await read_chunked(reader)
    if "content-length" in headers:
        return status, headers, await reader.readexactly(int(headers["content-length"]))
    return status, headers, await reader.read()


@pytest.fixture
async def raw(tmp_path: Path) -> AsyncIterator[tuple[int, ScriptedUpstream, Proxy, FakeVMs]]:
    upstream = ScriptedUpstream()
    server = await asyncio.start_server(upstream.serve, "127.0.0.1", 0)
    up_port = server.sockets[0].getsockname()[1]
    proxy_port = free_port()
    settings = Settings(data_dir=tmp_path, proxy_addr=f"127.0.0.1:{proxy_port}")
    vms = FakeVMs(hot=True)
    proxy = Proxy(settings, vms, FakeRoutes(up_port, "raw"), None, Activity(vms))  # type: ignore[arg-type]
    await proxy.start()
    yield proxy_port, upstream, proxy, vms
    await proxy.close()
    server.close()


async def connect(port: int) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
    return await asyncio.open_connection("127.0.0.1", port)


def get(path: str, method: str = "GET", host: str = "raw.hatch.local", extra: str = "") -> bytes:
    return f"{method} {path} HTTP/1.1\r\nHost: {host}\r\n{extra}\r\n".encode()


async def test_pipelined_requests_are_answered_in_order_on_one_upstream(raw) -> None:
    port, upstream, _proxy, _vms = raw
    reader, writer = await connect(port)
    writer.write(b"".join(get(f"/n{i}") for i in range(5)))
    for i in range(5):
        status, _headers, body = await read_response(reader)
        assert status == 200 and json.loads(body)["path"] == f"/n{i}"
    writer.close()
    assert upstream.connections == 1


async def test_head_then_get_on_one_connection(raw) -> None:
    port, upstream, _proxy, _vms = raw
    reader, writer = await connect(port)
    writer.write(get("/thing", "HEAD"))
    status, headers, _ = await read_response(reader, head=True)
    assert status == 200 and int(headers["content-length"]) > 0
    writer.write(get("/after-head"))
    status, _headers, body = await read_response(reader)
    assert json.loads(body)["path"] == "/after-head"
    writer.close()
    assert upstream.connections == 1  # the HEAD response did not spoil the connection


async def test_no_content_and_close_delimited_bodies(raw) -> None:
    port, _upstream, _proxy, _vms = raw
    reader, writer = await connect(port)
    writer.write(get("/no-content"))
    status, headers, _ = await read_response(reader)
    assert status == 204 and headers["x-kind"] == "empty"
    assert "transfer-encoding" not in headers and "content-length" not in headers
    writer.write(get("/close-delimited"))
    status, headers, body = await read_response(reader)
    # The guest ended its body by closing; the client keeps its connection, body re-chunked.
    assert (status, headers["transfer-encoding"], body) == (200, "chunked", b"until the end")
    writer.write(get("/still-open"))
    status, _headers, body = await read_response(reader)
    assert json.loads(body)["path"] == "/still-open"
    writer.close()


async def test_http10_client_gets_its_answer_and_a_close(raw) -> None:
    port, _upstream, _proxy, _vms = raw
    reader, writer = await connect(port)
    writer.write(b"GET /old HTTP/1.0\r\nHost: raw.hatch.local\r\n\r\n")
    status, headers, body = await read_response(reader)
    assert status == 200 and json.loads(body)["path"] == "/old"
    assert headers.get("connection") == "close"
    assert await asyncio.wait_for(reader.read(), 5) == b""
    writer.close()


async def test_expect_continue_and_chunked_request_body(raw) -> None:
    port, upstream, _proxy, _vms = raw
    reader, writer = await connect(port)
    writer.write(get("/upload", "POST", extra="Content-Length: 11\r\nExpect: 100-continue\r\n"))
    status, _headers, _ = await read_response(reader)
    assert status == 100  # relayed from the guest before the body is sent
    writer.write(b"hello world")
    status, _headers, body = await read_response(reader)
    assert json.loads(body) == {"method": "POST", "path": "/upload", "body": 11}
    writer.write(get("/chunks", "POST", extra="Transfer-Encoding: chunked\r\n"))
    writer.write(b"5\r\nhello\r\n6\r\n world\r\n0\r\n\r\n")
    status, _headers, body = await read_response(reader)
    assert json.loads(body)["body"] == 11
    assert b"transfer-encoding: chunked" in upstream.heads[-1].lower()
    writer.close()


async def test_a_kept_alive_connection_the_guest_dropped_is_retried(raw) -> None:
    port, upstream, _proxy, _vms = raw
    reader, writer = await connect(port)
    writer.write(get("/drop-next"))
    assert (await read_response(reader))[0] == 200
    writer.write(get("/retried"))  # lands on the pooled connection, which the guest drops
    status, _headers, body = await read_response(reader)
    assert status == 200 and json.loads(body)["path"] == "/retried"
    assert upstream.connections == 2
    writer.close()


async def test_new_vm_incarnation_gets_new_connections(raw) -> None:
    port, upstream, _proxy, vms = raw
    reader, writer = await connect(port)
    writer.write(get("/a"))
    await read_response(reader)
    vms.vm.updated_at = "boot-2"  # restored or restarted: old connections lead nowhere
    writer.write(get("/b"))
    await read_response(reader)
    assert upstream.connections == 2
    writer.close()


@pytest.mark.parametrize(
    ("request_bytes", "status", "words"),
    [
        (b"GARBAGE\r\n\r\n", 400, "malformed request"),
        (get("/", extra="X-Big: " + "a" * 70_000 + "\r\n"), 431, "larger than 64 KiB"),
        (b"CONNECT raw.hatch.local:443 HTTP/1.1\r\nHost: raw.hatch.local\r\n\r\n", 400, "CONNECT"),
        (get("/", host="raw.elsewhere.example"), 404, "no route"),
    ],
)
async def test_bad_requests_get_json_errors(raw, request_bytes: bytes, status: int, words: str):
    port, _upstream, _proxy, _vms = raw
    reader, writer = await connect(port)
    writer.write(request_bytes)
    got, headers, body = await read_response(reader)
    assert got == status and headers["content-type"] == "application/json"
    assert words in json.loads(body)["error"]
    writer.close()


async def test_refused_target_is_502_and_the_connection_lives_on(raw) -> None:
    port, _upstream, proxy, _vms = raw
    proxy.routes.route.target_port = free_port()  # nothing listens there
    reader, writer = await connect(port)
    writer.write(get("/"))
    status, _headers, body = await read_response(reader)
    assert status == 502 and "refused the connection" in json.loads(body)["error"]
    writer.write(get("/", host="nope.hatch.local"))
    assert (await read_response(reader))[0] == 404
    writer.close()


async def test_client_leaving_mid_request_frees_everything(raw) -> None:
    port, _upstream, proxy, vms = raw
    reader, writer = await connect(port)
    writer.write(get("/upload", "POST", extra="Content-Length: 1000000\r\n") + b"partial")
    await eventually(lambda: proxy.activity.busy(vms.vm.id), "the request to reach the vm")
    writer.close()
    await eventually(
        lambda: not proxy.activity.busy(vms.vm.id) and not proxy.connections,
        "the abandoned request to be freed",
    )
    reader, writer = await connect(port)  # and the proxy serves on
    writer.write(get("/next"))
    assert (await read_response(reader))[0] == 200
    writer.close()
