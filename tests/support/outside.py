"""Stand-ins for what lies beyond the host: "the internet", "the LAN", "a metadata server".

All of them live in one extra network namespace, made by the test inside the suite's own
namespace and joined to it by a veth pair; the host routes each stand-in address through that
veth, so a guest's traffic to them takes the real egress path (forward chain, masquerade).
A server in that namespace answers HTTP on every address and port it is given, telling the
client which address it reached and which address it saw the request come from.
"""

from __future__ import annotations

import os
import socket
import subprocess
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

from tests.support.wait import wait_for

# The link between the host and the outside: the host's end is a public-looking host address.
HOST_UPLINK = "198.51.100.1"
OUTSIDE_UPLINK = "198.51.100.2"

_SERVER = Path(__file__).with_name("outside_server.py")


@dataclass(frozen=True)
class Outside:
    netns: str
    veth: str
    addresses: tuple[str, ...]
    ports: tuple[int, ...]


def _run(*cmd: str) -> None:
    subprocess.run(cmd, check=True, capture_output=True)


HTTP_REQUEST = b"GET / HTTP/1.0\r\nHost: probe\r\n\r\n"
# What an SSH client says first: the SSH gateway connects nothing before it (RFC 4253 4.2).
SSH_HELLO = b"SSH-2.0-probe\r\n"


def answers(host: str, port: int, timeout: float = 3.0, greeting: bytes = HTTP_REQUEST) -> bytes:
    """The first bytes a TCP service at host:port sends after the greeting ('' if none)."""
    try:
        with socket.create_connection((host, port), timeout=timeout) as sock:
            sock.sendall(greeting)
            return sock.recv(256)
    except OSError:
        return b""


@contextmanager
def outside_world(addresses: list[str], ports: tuple[int, ...] = (80,)) -> Iterator[Outside]:
    """A namespace holding `addresses`, each answering HTTP on `ports`, routed from here."""
    netns = f"hvout{os.getpid()}"
    veth = "hvup0"
    server: subprocess.Popen[bytes] | None = None
    try:
        _run("ip", "netns", "add", netns)
        _run("ip", "link", "add", veth, "type", "veth", "peer", "name", "up0", "netns", netns)
        _run("ip", "addr", "add", f"{HOST_UPLINK}/24", "dev", veth)
        _run("ip", "link", "set", veth, "up")
        inside = ("ip", "netns", "exec", netns)
        _run(*inside, "ip", "link", "set", "lo", "up")
        _run(*inside, "ip", "addr", "add", f"{OUTSIDE_UPLINK}/24", "dev", "up0")
        _run(*inside, "ip", "link", "set", "up0", "up")
        _run(*inside, "ip", "route", "add", "default", "via", HOST_UPLINK)
        for address in addresses:
            _run(*inside, "ip", "addr", "add", f"{address}/32", "dev", "lo")
            _run("ip", "route", "add", f"{address}/32", "via", OUTSIDE_UPLINK)
        server = subprocess.Popen(
            [*inside, sys.executable, str(_SERVER), *map(str, ports)],
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
        )
        for address in addresses:
            for port in ports:
                # The positive control of every "blocked": the host itself reaches the listener.
                wait_for(lambda a=address, p=port: answers(a, p), 30, f"outside {address}:{port}")
        yield Outside(netns, veth, tuple(addresses), ports)
    finally:
        if server is not None:
            server.kill()
            server.wait()
        subprocess.run(["ip", "netns", "del", netns], check=False, capture_output=True)
        subprocess.run(["ip", "link", "del", veth], check=False, capture_output=True)
