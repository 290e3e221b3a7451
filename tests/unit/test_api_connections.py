"""The API listener's guard (api/connections.py), on a real uvicorn server on loopback with a
small app, on both asyncio's loop and uvloop (hatchd's): silent and trickling clients are cut
off with a 408 once the head deadline passes, connections beyond the per-address and total
limits are refused (429, 503), and every slot comes back when its connection ends. Each refusal
has its positive control: the same probe, within the limits, is served."""

from __future__ import annotations

import asyncio
import json
import logging
import socket
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass

import pytest
import uvicorn
import uvloop
from fastapi import FastAPI

from hatchvm.api.connections import guarded_protocol
from hatchvm.proxy.limits import Admission

HEAD_TIMEOUT = 0.5
IO_TIMEOUT = 10.0  # a safety net against a hung socket, not a measured duration
REQUEST = b"GET /ping HTTP/1.1\r\nHost: hatchd\r\n\r\n"
PONG = b'{"pong":"yes"}'

Run = Callable[[Callable[[], Awaitable[None]]], None]


@pytest.fixture(params=["asyncio", "uvloop"])
def run(request: pytest.FixtureRequest) -> Run:
    """Runs a test's body on one of the loops (each test runs on both)."""
    runner = uvloop.run if request.param == "uvloop" else asyncio.run
    return lambda body: runner(body())


@dataclass
class Listener:
    admission: Admission
    port: int

    def connect(self) -> socket.socket:
        return socket.create_connection(("127.0.0.1", self.port), timeout=IO_TIMEOUT)


@asynccontextmanager
async def serving(total: int = 100, per_address: int = 100) -> AsyncIterator[Listener]:
    """A uvicorn server on loopback with the guard, serving a small app."""
    app = FastAPI()

    @app.get("/ping")
    async def ping() -> dict[str, str]:
        return {"pong": "yes"}

    admission = Admission(total, per_address, "the API")
    config = uvicorn.Config(
        app,
        host="127.0.0.1",
        port=0,
        log_config=None,
        access_log=False,
        lifespan="off",
        http=guarded_protocol(admission, HEAD_TIMEOUT),
        ws="none",  # as hatchd's
    )
    server = uvicorn.Server(config)
    task = asyncio.create_task(server.serve())
    try:
        await _until(lambda: server.started)
        yield Listener(admission, server.servers[0].sockets[0].getsockname()[1])
        await _until(lambda: admission.open == 0)  # every slot back
    finally:
        server.should_exit = True
        await task


def test_a_silent_client_gets_a_408_after_the_head_deadline(run: Run) -> None:
    async def body() -> None:
        async with serving() as listener:
            with listener.connect() as served:  # positive control: a request in time
                assert await _ask(served) == PONG
            with listener.connect() as silent:
                began = time.monotonic()
                answer = await asyncio.to_thread(_read_until_closed, silent)
                waited = time.monotonic() - began
            assert _status_and_error(answer) == (
                408,
                f"no complete request head within {HEAD_TIMEOUT:g} seconds",
            )
            assert waited >= HEAD_TIMEOUT * 0.9  # the deadline, not at once

    run(body)


def test_a_trickled_head_is_cut_off_too(run: Run) -> None:
    def trickle(listener: Listener) -> bytes:
        with listener.connect() as sock:
            deadline = time.monotonic() + IO_TIMEOUT
            for byte in REQUEST[:-4]:  # never the blank line that ends the head
                try:
                    sock.sendall(bytes([byte]))
                except OSError:
                    break  # cut off
                if time.monotonic() > deadline:
                    break
                time.sleep(0.05)
            return _read_until_closed(sock)

    async def body() -> None:
        async with serving() as listener:
            answer = await asyncio.to_thread(trickle, listener)
            assert _status_and_error(answer)[0] == 408

    run(body)


def test_the_deadline_applies_again_after_each_response(run: Run) -> None:
    async def body() -> None:
        async with serving() as listener:
            with listener.connect() as sock:
                for _ in range(2):  # two requests, each within the deadline: both answered
                    assert await _ask(sock) == PONG
                    await asyncio.sleep(HEAD_TIMEOUT / 2)
                sock.sendall(REQUEST[:10])  # then a head that never ends
                answer = await asyncio.to_thread(_read_until_closed, sock)
            assert _status_and_error(answer)[0] == 408

    run(body)


def test_connections_beyond_the_per_address_limit_get_429(run: Run) -> None:
    async def body() -> None:
        async with serving(per_address=3) as listener:
            held = [listener.connect() for _ in range(3)]
            try:
                await _until(lambda: listener.admission.open == 3)
                with listener.connect() as fourth:
                    answer = await asyncio.to_thread(_read_until_closed, fourth)
                assert _status_and_error(answer) == (
                    429,
                    "too many connections from 127.0.0.1 (limit 3)",
                )
                held.pop().close()
                await _until(lambda: listener.admission.open == 2)
                with listener.connect() as again:  # a slot is free: served
                    assert await _ask(again) == PONG
            finally:
                for sock in held:
                    sock.close()

    run(body)


def test_connections_beyond_the_total_get_503(run: Run) -> None:
    async def body() -> None:
        async with serving(total=2) as listener:
            held = [listener.connect() for _ in range(2)]
            try:
                await _until(lambda: listener.admission.open == 2)
                with listener.connect() as third:
                    answer = await asyncio.to_thread(_read_until_closed, third)
                assert _status_and_error(answer) == (
                    503,
                    "the API is at its limit of 2 connections",
                )
            finally:
                for sock in held:
                    sock.close()
            await _until(lambda: listener.admission.open == 0)
            with listener.connect() as after:  # all released: served again
                assert await _ask(after) == PONG

    run(body)


def test_bad_requests_are_answered_without_a_log_line_each(
    run: Run, caplog: pytest.LogCaptureFixture
) -> None:
    upgrade = REQUEST.replace(b"\r\n\r\n", b"\r\nConnection: Upgrade\r\nUpgrade: websocket\r\n\r\n")

    async def body() -> None:
        async with serving() as listener:
            for _ in range(5):
                with listener.connect() as sock:  # no WebSocket here: a plain request
                    sock.sendall(upgrade)
                    assert await asyncio.to_thread(_read_answer, sock) == PONG
                with listener.connect() as sock:
                    sock.sendall(b"NONSENSE\r\n\r\n")
                    answer = await asyncio.to_thread(_read_until_closed, sock)
                    assert answer.startswith(b"HTTP/1.1 400 ")

    with caplog.at_level(logging.INFO, logger="uvicorn.error"):
        run(body)
    uvicorn_lines = [r.getMessage() for r in caplog.records if r.name == "uvicorn.error"]
    assert any("Started server process" in line for line in uvicorn_lines)  # it is captured
    assert not [line for line in uvicorn_lines if "request" in line.lower()], uvicorn_lines


async def _ask(sock: socket.socket) -> bytes:
    """A request and its answer's body (read off the loop: the server is on it)."""
    sock.sendall(REQUEST)
    return await asyncio.to_thread(_read_answer, sock)


def _read_answer(sock: socket.socket) -> bytes:
    data = b""
    while b"\r\n\r\n" not in data:
        chunk = sock.recv(65536)
        assert chunk, f"closed before an answer: {data!r}"
        data += chunk
    head, _, body = data.partition(b"\r\n\r\n")
    lines = [line.lower() for line in head.split(b"\r\n")]
    length = next(int(line[15:]) for line in lines if line.startswith(b"content-length:"))
    while len(body) < length:
        chunk = sock.recv(65536)
        assert chunk, "closed within the body"
        body += chunk
    return body


def _read_until_closed(sock: socket.socket) -> bytes:
    """Everything the server sends until it closes the connection."""
    data = b""
    while chunk := sock.recv(65536):
        data += chunk
    return data


def _status_and_error(answer: bytes) -> tuple[int, str]:
    head, _, body = answer.partition(b"\r\n\r\n")
    return int(head.split(b" ", 2)[1]), str(json.loads(body)["error"])


async def _until(condition: Callable[[], bool]) -> None:
    deadline = time.monotonic() + IO_TIMEOUT
    while not condition():
        assert time.monotonic() < deadline, "condition not reached"
        await asyncio.sleep(0.01)
