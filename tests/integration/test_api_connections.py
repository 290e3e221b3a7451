"""hatchd's API listener holds no connection a client leaves without a request head, and
bounds the connections one address holds (api/connections.py; its rules are tested in
tests/unit/test_api_connections.py): here, that the daemon's own listeners (the API's, and
the metrics one of HATCH_METRICS_ADDR) have the guard."""

from __future__ import annotations

import json
import socket
from typing import Any

import pytest

pytestmark = pytest.mark.vm

IO_TIMEOUT = 30.0  # a safety net against a hung socket, not a measured duration


def read_until_closed(sock: socket.socket) -> tuple[int, str]:
    data = b""
    while chunk := sock.recv(65536):
        data += chunk
    head, _, body = data.partition(b"\r\n\r\n")
    return int(head.split(b" ", 2)[1]), str(json.loads(body)["error"])


def test_hatchd_cuts_off_silent_clients_and_bounds_one_addresss_connections(
    daemon_factory: Any,
) -> None:
    hatch = daemon_factory(HATCH_API_HEAD_TIMEOUT="1", HATCH_API_MAX_CONNECTIONS_PER_ADDRESS="2")
    hatch.start()

    def connect() -> socket.socket:
        return socket.create_connection(("127.0.0.1", hatch.port), timeout=IO_TIMEOUT)

    with connect() as silent:
        assert read_until_closed(silent) == (408, "no complete request head within 1 seconds")
    first, second = connect(), connect()
    try:
        first.sendall(b"GET /healthz HTTP/1.1\r\nHost: hatchd\r\n\r\n")  # held, and served
        assert first.recv(65536).startswith(b"HTTP/1.1 200 ")
        with connect() as third:
            assert read_until_closed(third) == (
                429,
                "too many connections from 127.0.0.1 (limit 2)",
            )
    finally:
        for held in (first, second):  # ended, and seen to end by hatchd: their slots are free
            held.shutdown(socket.SHUT_WR)
            while held.recv(65536):
                pass
            held.close()
    with hatch.client(hatch.create_key("alice")) as api:  # slots freed: the API serves again
        assert api.list_vms() == []


def test_the_metrics_listener_cuts_off_silent_clients_too(daemon_factory: Any) -> None:
    with socket.socket() as probe:  # a free port for it
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    hatch = daemon_factory(HATCH_API_HEAD_TIMEOUT="1", HATCH_METRICS_ADDR=f"127.0.0.1:{port}")
    hatch.start()
    with socket.create_connection(("127.0.0.1", port), timeout=IO_TIMEOUT) as scrape:
        scrape.sendall(b"GET /metrics HTTP/1.1\r\nHost: hatchd\r\n\r\n")  # served
        assert scrape.recv(65536).startswith(b"HTTP/1.1 200 ")
    with socket.create_connection(("127.0.0.1", port), timeout=IO_TIMEOUT) as silent:
        assert read_until_closed(silent) == (408, "no complete request head within 1 seconds")
