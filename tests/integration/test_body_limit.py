"""The API's 1 MiB body limit, against a real hatchd over raw sockets: refused from the head when
declared, cut off while streaming when chunked, memory bounded, connections not reused with
half a body in them."""

from __future__ import annotations

import json
import select
import socket
from pathlib import Path

import httpx
import pytest

from hatchvm.api.body_limit import MAX_BODY_BYTES

pytestmark = pytest.mark.vm

CHUNK = 64 * 1024
IO_TIMEOUT = 30.0  # a safety net against a hung socket, not a measured duration


@pytest.fixture
def key(hatch) -> str:
    return hatch.create_key("alice")


def connect(hatch) -> socket.socket:
    sock = socket.create_connection(("127.0.0.1", hatch.port), timeout=IO_TIMEOUT)
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    return sock


def head(path: str, key: str, *headers: str, method: str = "POST") -> bytes:
    lines = [f"{method} {path} HTTP/1.1", "Host: hatchd", f"Authorization: Bearer {key}"]
    return ("\r\n".join([*lines, *headers]) + "\r\n\r\n").encode()


class Answer:
    def __init__(self, status: int, headers: dict[str, str], body: bytes) -> None:
        self.status, self.headers, self.body = status, headers, body

    def error(self) -> str:
        data = json.loads(self.body)
        assert set(data) == {"error"}, data
        return str(data["error"])


def read_answer(sock: socket.socket) -> Answer:
    """One HTTP/1.1 response with a Content-Length (hatchd's JSON answers all have one)."""
    buf = b""
    while b"\r\n\r\n" not in buf:
        data = sock.recv(65536)
        assert data, f"connection closed before a response head: {buf!r}"
        buf += data
    raw_head, _, body = buf.partition(b"\r\n\r\n")
    status_line, *header_lines = raw_head.decode("latin-1").split("\r\n")
    headers = {}
    for line in header_lines:
        name, _, value = line.partition(":")
        headers[name.strip().lower()] = value.strip()
    length = int(headers["content-length"])
    while len(body) < length:
        data = sock.recv(65536)
        assert data, "connection closed in the middle of a response body"
        body += data
    return Answer(int(status_line.split()[1]), headers, body[:length])


def closed_by_server(sock: socket.socket) -> bool:
    """The server closed its end: the next read returns EOF (or a reset, if we kept sending)."""
    try:
        while data := sock.recv(65536):
            assert not data.startswith(b"HTTP/"), f"a second response on the connection: {data!r}"
        return True
    except ConnectionResetError:
        return True


def stream_until_answered(sock: socket.socket, cap: int) -> int:
    """Send chunks of an endless chunked body until the server answers; the bytes sent."""
    chunk = f"{CHUNK:x}\r\n".encode() + b" " * CHUNK + b"\r\n"
    sent = 0
    while sent < cap:
        readable, _, _ = select.select([sock], [], [], 0)
        if readable:
            return sent
        try:
            sock.sendall(chunk)
        except (BrokenPipeError, ConnectionResetError):
            return sent  # closed after its answer, which is waiting in our receive buffer
        sent += CHUNK
    raise AssertionError(f"no answer after {sent} bytes of body")


def rss_kib(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    raise AssertionError("no VmRSS")


def works_on_fresh_connection(hatch, key: str) -> None:
    r = httpx.get(hatch.url + "/vms", headers={"Authorization": f"Bearer {key}"}, timeout=30)
    assert r.status_code == 200 and r.json() == []


def test_declared_length_over_the_limit_is_refused_from_the_head(hatch, key) -> None:
    before = rss_kib(hatch.proc.pid)
    with connect(hatch) as sock:
        # 100 MiB announced, not one byte of it sent: the answer must come from the head alone.
        sock.sendall(
            head("/vms", key, "Content-Type: application/json", f"Content-Length: {100 << 20}")
        )
        answer = read_answer(sock)
        assert answer.status == 413
        assert answer.error() == f"request body too large (max {MAX_BODY_BYTES} bytes)"
        assert answer.headers["connection"] == "close"
        assert closed_by_server(sock)
    # The same on a path whose handler never reads a body, and on an unknown one.
    for path in ("/vms/vm_nope/stop", "/nowhere"):
        with connect(hatch) as sock:
            sock.sendall(head(path, key, f"Content-Length: {MAX_BODY_BYTES + 1}"))
            assert read_answer(sock).status == 413
    assert rss_kib(hatch.proc.pid) - before < 16 * 1024
    works_on_fresh_connection(hatch, key)


def test_body_at_the_limit_is_read(hatch, key) -> None:
    """Positive control: exactly 1 MiB (JSON padded with spaces) reaches the handler, which
    parses it and answers for the missing VM; so does a chunked body of the same size."""
    body = b'{"snapshot_id": "snap_x"}'
    body += b" " * (MAX_BODY_BYTES - len(body))
    with connect(hatch) as sock:
        sock.sendall(head("/vms/vm_nope/restore", key, f"Content-Length: {len(body)}") + body)
        answer = read_answer(sock)
        assert answer.status == 404 and answer.error() == "vm vm_nope not found"
        assert "connection" not in answer.headers
        # Kept alive: a second request on the same connection is answered.
        sock.sendall(head("/vms", key, method="GET"))
        assert read_answer(sock).status == 200
    with connect(hatch) as sock:
        sock.sendall(head("/vms/vm_nope/restore", key, "Transfer-Encoding: chunked"))
        for start in range(0, len(body), CHUNK):
            piece = body[start : start + CHUNK]
            sock.sendall(f"{len(piece):x}\r\n".encode() + piece + b"\r\n")
        sock.sendall(b"0\r\n\r\n")
        answer = read_answer(sock)
        assert answer.status == 404 and answer.error() == "vm vm_nope not found"


def test_endless_chunked_body_is_cut_off(hatch, key) -> None:
    before = rss_kib(hatch.proc.pid)
    with connect(hatch) as sock:
        sock.sendall(
            head("/vms", key, "Content-Type: application/json", "Transfer-Encoding: chunked")
        )
        sent = stream_until_answered(sock, cap=256 << 20)
        answer = read_answer(sock)
        assert answer.status == 413, answer.body
        assert answer.error() == f"request body too large (max {MAX_BODY_BYTES} bytes)"
        assert answer.headers["connection"] == "close"
        assert closed_by_server(sock)
    # Refused once past the limit; what was sent beyond it sat in socket buffers.
    assert MAX_BODY_BYTES < sent < 32 << 20, sent
    assert rss_kib(hatch.proc.pid) - before < 16 * 1024
    works_on_fresh_connection(hatch, key)


def test_unread_chunked_body_does_not_keep_the_connection(hatch, key) -> None:
    """A handler that never reads the body answers at once; the server then closes instead of
    draining a body that may never end."""
    with connect(hatch) as sock:
        sock.sendall(head("/vms/vm_nope/stop", key, "Transfer-Encoding: chunked"))
        stream_until_answered(sock, cap=256 << 20)
        answer = read_answer(sock)
        assert answer.status == 404 and answer.headers["connection"] == "close"
        assert closed_by_server(sock)
    works_on_fresh_connection(hatch, key)
