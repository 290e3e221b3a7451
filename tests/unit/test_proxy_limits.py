"""The proxy's limits, in-process: connection caps in total and per address, every head capped
in size, every phase of a connection timed (phases.py), trusted proxies. A raw client talks to
the real Proxy; behind it a scripted guest that misbehaves on purpose (endless heads, silence,
stalls). Timeouts are set to fractions of a second, so each attack ends quickly; every attack
has a positive control beside it, an ordinary request that must still be answered."""

from __future__ import annotations

import asyncio
import json
import socket
import tracemalloc
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path

import pytest

from hatchvm.config import Settings
from hatchvm.core.activity import Activity
from hatchvm.proxy.server import Proxy
from tests.support.daemon import free_port
from tests.unit.proxy_fakes import FakeRoutes, FakeVMs
from tests.unit.test_proxy_protocol import eventually, get, read_chunked, read_response

MIB = 1 << 20
BOUND = 4 * MIB  # how much a hostile script sends at most, so the old code fails, not hangs


class HostileGuest:
    """Answers by path; counts the connections the proxy dropped while this guest was still
    sending or waiting."""

    def __init__(self) -> None:
        self.dropped = 0
        self.heads: list[bytes] = []
        self.stop = asyncio.Event()  # set at teardown: scripts that hold on let go

    async def serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            while True:
                head = await reader.readuntil(b"\r\n\r\n")
                self.heads.append(head)
                path = head.split(b" ")[1].decode()
                if not await self._answer(path, head, reader, writer):
                    return
        except (asyncio.IncompleteReadError, ConnectionError):
            self.dropped += 1
        finally:
            writer.close()

    async def _answer(
        self, path: str, head: bytes, reader: asyncio.StreamReader, writer: asyncio.StreamWriter
    ) -> bool:
        if path == "/endless-lines":
            writer.write(b"HTTP/1.1 200 OK\r\n")
            await self._spew(reader, writer, b"X-Endless: " + b"a" * 50 + b"\r\n")
        elif path == "/endless-value":
            writer.write(b"HTTP/1.1 200 OK\r\nX-Endless: ")
            await self._spew(reader, writer, b"a" * 1024)
        elif path == "/endless-trailers":
            writer.write(b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n")
            writer.write(b"5\r\nhello\r\n0\r\n")
            await self._spew(reader, writer, b"X-Trailer: " + b"t" * 50 + b"\r\n")
        elif path == "/silent":
            await self._until_dropped(reader)
            return False
        elif path == "/unread-body":  # reads nothing: its window fills up
            await asyncio.wait_for(self.stop.wait(), 30)
            return False
        elif path == "/stall-body":
            writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: 1000\r\n\r\n0123456789")
            await writer.drain()
            await self._until_dropped(reader)
            return False
        elif path == "/big":
            writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: %d\r\n\r\n" % (8 * MIB))
            for _ in range(8):
                writer.write(b"b" * MIB)
                await writer.drain()
        else:
            headers = dict_of(head)
            if headers.get("transfer-encoding") == "chunked":
                body = await read_chunked(reader)
            else:
                body = await reader.readexactly(int(headers.get("content-length", "0")))
            answer = json.dumps({"path": path, "body": len(body), "head": head.decode()}).encode()
            writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: %d\r\n\r\n%b" % (len(answer), answer))
            await writer.drain()
        return True

    async def _until_dropped(self, reader: asyncio.StreamReader) -> None:
        await reader.read()  # the proxy's close (asyncio's abort sends a FIN, not a reset)
        self.dropped += 1

    async def _spew(
        self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter, piece: bytes
    ) -> None:
        """Send piece over and over (up to BOUND), then hold the connection until the proxy
        drops it. On a loaded host the sockets' buffers may take all of BOUND before the proxy
        gives up: its drop then shows as the end of what it sends, not as a failed write."""
        for _ in range(BOUND // len(piece)):
            writer.write(piece)
            await writer.drain()  # raises once the proxy has dropped the connection
        await asyncio.wait_for(self._until_dropped(reader), 30)


def dict_of(head: bytes) -> dict[str, str]:
    lines = head.decode().split("\r\n")[1:]
    return {k.lower(): v.strip() for k, v in (x.split(":", 1) for x in lines if x)}


Make = Callable[..., Awaitable[tuple[int, Proxy, HostileGuest]]]


@pytest.fixture
async def make(tmp_path: Path) -> AsyncIterator[Make]:
    """A proxy with the given settings in front of a hostile guest."""
    made: list[tuple[Proxy, asyncio.Server, HostileGuest]] = []

    async def build(**settings: object) -> tuple[int, Proxy, HostileGuest]:
        guest = HostileGuest()
        server = await asyncio.start_server(guest.serve, "127.0.0.1", 0)
        guest_port = server.sockets[0].getsockname()[1]
        port = free_port()
        s = Settings(data_dir=tmp_path, proxy_addr=f"127.0.0.1:{port}", **settings)  # type: ignore[arg-type]
        vms = FakeVMs(hot=True)
        proxy = Proxy(s, vms, FakeRoutes(guest_port, "raw"), None, Activity(vms))  # type: ignore[arg-type]
        await proxy.start()
        made.append((proxy, server, guest))
        return port, proxy, guest

    yield build
    for proxy, server, guest in made:
        await proxy.close()
        server.close()
        guest.stop.set()
    await asyncio.sleep(0.01)  # the held scripts end


async def connect(
    port: int, source: str = "127.0.0.1"
) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
    return await asyncio.open_connection("127.0.0.1", port, local_addr=(source, 0))


async def closed_by_proxy(reader: asyncio.StreamReader, timeout: float = 5.0) -> bytes:
    """Everything the proxy still sends until it closes the connection."""
    data = b""
    try:
        while chunk := await asyncio.wait_for(reader.read(65536), timeout):
            data += chunk
    except ConnectionResetError:
        pass
    return data


async def error_of(reader: asyncio.StreamReader) -> tuple[int, str]:
    status, headers, body = await read_response(reader)
    assert headers["content-type"] == "application/json"
    return status, json.loads(body)["error"]


async def served(port: int, path: str = "/ok", source: str = "127.0.0.1") -> int:
    reader, writer = await connect(port, source)
    writer.write(get(path))
    status = (await read_response(reader))[0]
    writer.close()
    return status


# ---- connection caps ------------------------------------------------------------------------


async def test_connections_over_the_per_address_limit_get_429(make: Make) -> None:
    port, proxy, _guest = await make(proxy_max_connections_per_address=3)
    held = [await connect(port) for _ in range(3)]
    await eventually(lambda: proxy.admission.open == 3, "three connections admitted")
    reader, writer = await connect(port)
    status, message = await error_of(reader)
    assert status == 429 and "too many connections from 127.0.0.1 (limit 3)" in message
    assert await closed_by_proxy(reader) == b""
    writer.close()
    assert await served(port, source="127.0.0.2") == 200  # another address is not affected
    held[0][1].write(get("/held"))  # the admitted ones are served
    assert (await read_response(held[0][0]))[0] == 200
    held.pop()[1].close()
    await eventually(lambda: proxy.admission.open == 2, "a connection to be released")
    assert await served(port) == 200  # its place is free again
    for _reader, writer in held:
        writer.close()


async def test_connections_over_the_total_limit_get_503(make: Make) -> None:
    port, proxy, _guest = await make(proxy_max_connections=4)
    held = [await connect(port, f"127.0.0.{n}") for n in (1, 2, 3, 4)]
    await eventually(lambda: proxy.admission.open == 4, "four connections admitted")
    reader, writer = await connect(port, "127.0.0.5")
    assert await error_of(reader) == (503, "the proxy is at its limit of 4 connections")
    writer.close()
    held.pop()[1].close()
    await eventually(lambda: proxy.admission.open == 3, "a connection to be released")
    assert await served(port, source="127.0.0.5") == 200


# ---- client timeouts ----------------------------------------------------------------------


async def test_slowloris_gets_408_and_a_silent_connection_is_closed(make: Make) -> None:
    port, proxy, _guest = await make(proxy_head_timeout=0.5)
    silent_reader, _silent = await connect(port)
    slow_reader, slow = await connect(port)
    request = get("/never-finished")
    for byte in request[:-2]:  # a byte every 50 ms: progress, but never a whole head
        if slow_reader._buffer or slow_reader.at_eof():  # type: ignore[attr-defined]
            break  # answered
        try:
            slow.write(bytes([byte]))
        except ConnectionError:
            break
        await asyncio.sleep(0.05)
    status, message = await error_of(slow_reader)
    assert status == 408 and "request head not received within 0.5s" in message
    assert await closed_by_proxy(silent_reader) == b""  # nothing asked, nothing answered
    assert await served(port) == 200  # a request that comes in time is served
    await eventually(lambda: not proxy.connections, "every connection to be gone")


async def test_idle_keep_alive_connection_is_closed(make: Make) -> None:
    port, _proxy, _guest = await make(proxy_keepalive_timeout=0.3)
    reader, writer = await connect(port)
    writer.write(get("/first"))
    assert (await read_response(reader))[0] == 200
    assert await closed_by_proxy(reader) == b""


@pytest.mark.parametrize("before", [b"", get("/first")], ids=["first", "kept-alive"])
async def test_endless_request_header_gets_431(make: Make, before: bytes) -> None:
    port, proxy, _guest = await make()
    reader, writer = await connect(port)
    if before:  # the endless head is the connection's second request
        writer.write(before)
        assert (await read_response(reader))[0] == 200
    writer.write(get("/").removesuffix(b"\r\n") + b"X-Endless: ")
    sent = 0
    while sent < BOUND and not reader.at_eof() and not writer.is_closing():
        writer.write(b"a" * 16384)  # one header value that never ends: httptools keeps it
        sent += 16384
        try:
            await writer.drain()
        except ConnectionError:
            break
        await asyncio.sleep(0.001)  # let the answer in
        if reader._buffer:  # type: ignore[attr-defined]  # the answer came
            break
    status, message = await error_of(reader)
    assert status == 431 and "request head larger than 64 KiB" in message
    assert sent < 1 * MIB
    assert await closed_by_proxy(reader) == b""
    writer.close()
    await eventually(lambda: not proxy.connections, "the connection to be closed")


async def test_a_large_head_pipelined_behind_a_small_request_gets_431(make: Make) -> None:
    port, _proxy, guest = await make()
    reader, writer = await connect(port)
    writer.write(get("/small") + get("/big", extra="X-Big: " + "b" * 70_000 + "\r\n"))
    assert (await read_response(reader))[0] == 200
    status, message = await error_of(reader)
    assert status == 431 and "request head larger than 64 KiB" in message
    assert [head.split(b" ")[1] for head in guest.heads] == [b"/small"]
    writer.close()


async def test_two_host_headers_get_400(make: Make) -> None:
    port, _proxy, guest = await make()
    reader, writer = await connect(port)
    writer.write(get("/", extra="Host: evil.hatch.local\r\n"))
    status, message = await error_of(reader)
    assert status == 400 and "more than one Host header" in message
    assert guest.heads == []
    assert await served(port) == 200


async def test_trailers_stay_with_their_message(make: Make) -> None:
    port, _proxy, guest = await make()
    reader, writer = await connect(port)
    writer.write(get("/chunked", "POST", extra="Transfer-Encoding: chunked\r\n"))
    writer.write(b"5\r\nhello\r\n0\r\nHost: evil.hatch.local\r\nX-Trailer: t\r\n\r\n")
    writer.write(get("/next"))
    for _ in range(2):
        assert (await read_response(reader))[0] == 200
    assert "x-trailer" not in dict_of(guest.heads[-1]) and b"evil" not in guest.heads[-1]
    writer.close()


async def test_stalled_request_body_gets_408(make: Make) -> None:
    port, proxy, guest = await make(proxy_client_timeout=0.4)
    reader, writer = await connect(port)
    writer.write(get("/upload", "POST", extra="Content-Length: 100\r\n") + b"0123456789")
    status, message = await error_of(reader)
    assert status == 408 and "the client sent or read nothing for 0.4s" in message
    await eventually(lambda: guest.dropped == 1, "the guest connection to be dropped")
    assert await closed_by_proxy(reader) == b""
    writer.close()
    await eventually(lambda: not proxy.connections, "the client connection to be closed")
    reader, writer = await connect(port)  # the whole body in time is fine
    writer.write(get("/upload", "POST", extra="Content-Length: 10\r\n") + b"0123456789")
    status, _headers, body = await read_response(reader)
    assert status == 200 and json.loads(body)["body"] == 10


async def test_client_that_stops_reading_is_cut_off(make: Make) -> None:
    port, proxy, guest = await make(proxy_client_timeout=0.4)
    _reader, writer = await connect(port)
    sock = writer.transport.get_extra_info("socket")
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)  # a small window fills fast
    writer.write(get("/big"))
    await eventually(lambda: bool(proxy.connections), "the request to arrive")
    await eventually(lambda: not proxy.connections, "the unread answer to be cut off", 10)
    await eventually(lambda: guest.dropped == 1, "the guest connection to be dropped")
    writer.close()


# ---- guest timeouts and hostile heads ---------------------------------------------------


async def test_silent_guest_gets_504_and_the_connection_lives_on(make: Make) -> None:
    port, _proxy, _guest = await make(proxy_upstream_timeout=0.4)
    reader, writer = await connect(port)
    writer.write(get("/silent"))
    status, message = await error_of(reader)
    assert status == 504 and "the target sent no response within 0.4s" in message
    writer.write(get("/after"))  # the request was whole: the client's connection is fine
    status, _headers, body = await read_response(reader)
    assert status == 200 and json.loads(body)["path"] == "/after"
    writer.close()


async def test_guest_that_reads_no_body_gets_504(make: Make) -> None:
    port, _proxy, _guest = await make(proxy_upstream_timeout=0.4, proxy_client_timeout=30)
    reader, writer = await connect(port)
    writer.write(get("/unread-body", "POST", extra=f"Content-Length: {64 * MIB}\r\n"))
    block = b"u" * MIB
    for _ in range(64):  # until the guest's window and ours are full and the proxy gives up
        if reader._buffer or reader.at_eof():  # type: ignore[attr-defined]
            break
        writer.write(block)
        try:
            await asyncio.wait_for(writer.drain(), 1.0)
        except (TimeoutError, ConnectionError):
            break
    status, message = await error_of(reader)
    assert status == 504 and "the target read none of the request for 0.4s" in message
    writer.close()


async def test_guest_stalling_mid_body_is_cut_off(make: Make) -> None:
    port, _proxy, guest = await make(proxy_upstream_timeout=0.4)
    reader, writer = await connect(port)
    writer.write(get("/stall-body"))
    received = await closed_by_proxy(reader)
    assert received.startswith(b"HTTP/1.1 200 OK\r\n") and received.endswith(b"0123456789")
    await eventually(lambda: guest.dropped == 1, "the guest connection to be dropped")
    assert await served(port) == 200


@pytest.mark.parametrize("path", ["/endless-lines", "/endless-value"])
async def test_endless_response_head_gets_502_with_bounded_memory(make: Make, path: str) -> None:
    port, proxy, guest = await make()
    tracemalloc.start()
    try:
        reader, writer = await connect(port)
        writer.write(get(path))
        status, message = await asyncio.wait_for(error_of(reader), 10)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert status == 502 and "the target's response head is larger than 64 KiB" in message
    assert peak < 4 * MIB, f"the proxy held {peak / MIB:.1f} MiB of a hostile head"
    await eventually(lambda: guest.dropped == 1, "the guest connection to be dropped")
    assert not proxy.pool._idle  # never pooled
    writer.write(get("/after"))  # the client's connection is fine
    assert (await read_response(reader))[0] == 200
    writer.close()


async def test_endless_trailers_cut_the_response_off(make: Make) -> None:
    port, _proxy, guest = await make()
    reader, _writer = await connect(port)
    _writer.write(get("/endless-trailers"))
    received = await closed_by_proxy(reader, timeout=10)
    assert b"hello" in received and not received.endswith(b"0\r\n\r\n")
    await eventually(lambda: guest.dropped == 1, "the guest connection to be dropped")


# ---- trusted proxies ----------------------------------------------------------------------


async def test_trusted_proxy_forwards_for_its_clients(make: Make) -> None:
    port, proxy, guest = await make(
        proxy_trusted_proxies="127.0.0.0/8",
        proxy_max_connections_per_address=1,
        proxy_upstream_timeout=5,
    )
    edge = [await connect(port) for _ in range(3)]  # the edge's own connections: not capped
    await eventually(lambda: len(proxy.connections) == 3, "the edge's connections admitted")
    forwarded = "X-Forwarded-For: 203.0.113.9\r\nX-Forwarded-Proto: https\r\n"
    edge[0][1].write(get("/headers", extra=forwarded + "X-Forwarded-Host: shop.example\r\n"))
    _status, _headers, body = await read_response(edge[0][0])
    seen = dict_of(json.loads(body)["head"].encode())
    assert seen["x-forwarded-for"] == "203.0.113.9, 127.0.0.1"
    assert seen["x-forwarded-proto"] == "https" and seen["x-forwarded-host"] == "shop.example"

    edge[0][1].write(get("/silent", extra=forwarded))  # in progress for 203.0.113.9
    await eventually(lambda: len(guest.heads) == 2, "the held request to reach the guest")
    edge[1][1].write(get("/second", extra="X-Forwarded-For: 10.9.9.9, 203.0.113.9\r\n"))
    status, message = await error_of(edge[1][0])
    assert status == 429 and "from 203.0.113.9 (limit 1)" in message
    edge[2][1].write(get("/other", extra="X-Forwarded-For: 198.51.100.7\r\n"))
    assert (await read_response(edge[2][0]))[0] == 200  # another client is served
    for _reader, writer in edge:
        writer.close()


# ---- the clock ------------------------------------------------------------------------------


def test_one_timeout_per_phase() -> None:
    from hatchvm.proxy.phases import Phase, Timeouts  # here: the other tests also run on old code

    t = Timeouts(head=1, keepalive=2, client=3, upstream=4)
    assert t.of(Phase.IDLE, client_stalls=True) == 2
    assert t.of(Phase.HEAD, client_stalls=True) == 1
    for phase in (Phase.SENDING, Phase.WAITING, Phase.STREAMING):
        assert t.of(phase, client_stalls=True) == 3
        assert t.of(phase, client_stalls=False) == 4
    for phase in (Phase.QUEUED, Phase.CONNECTING, Phase.TUNNEL, Phase.DONE):
        assert t.of(phase, client_stalls=False) is None
    assert t.tick == 0.25
