"""Guests are hostile: what a guest can reach of the host and of the outside, probed from real
guests. Every "blocked" has its positive control: the same probe from the same guest reaches an
allowed stand-in, and the host itself reaches the very listener the guest could not."""

from __future__ import annotations

import subprocess
import threading
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import httpx
import pytest

from tests.support.outside import HOST_UPLINK, SSH_HELLO, answers, outside_world
from tests.support.probe import latest_round, probe_results, probe_script
from tests.support.wait import wait_for, wait_http

pytestmark = pytest.mark.vm

PUBLIC = "203.0.113.10"  # an allowed "internet" host
PUBLIC_DENIED = "203.0.113.20"  # public, but on the operator's deny list
MIRROR = "10.98.0.10"  # private, but on the operator's allow list (a package mirror)
LAN = "10.99.0.10"
PRIVATE_172 = "172.29.0.10"
PRIVATE_192 = "192.168.77.10"
SHARED = "100.64.0.10"
METADATA = "169.254.169.254"
DNS = "10.97.0.53"  # the guests' DNS server, inside a default-denied range
HOST_LO = "203.0.113.1"  # an address of the host, on its loopback device

STAND_INS = [PUBLIC, PUBLIC_DENIED, MIRROR, LAN, PRIVATE_172, PRIVATE_192, SHARED, METADATA, DNS]

WEB_SERVER = """#!/bin/sh
mkdir -p /srv/www
echo "hello from $(hostname)" > /srv/www/index.html
busybox httpd -p 8080 -h /srv/www
"""


@pytest.fixture
def outside() -> Iterator[None]:
    with outside_world(STAND_INS, ports=(80, 53)):
        yield


class _Service(BaseHTTPRequestHandler):
    def do_GET(self) -> None:
        self.send_response(200)
        self.end_headers()
        self.wfile.write(b"host service")

    def log_message(self, *args: object) -> None:
        pass


@pytest.fixture
def host_service() -> Iterator[int]:
    """A service of the host's on every host address, HOST_LO (on loopback) included."""
    subprocess.run(["ip", "addr", "add", f"{HOST_LO}/32", "dev", "lo"], check=True)
    server = ThreadingHTTPServer(("0.0.0.0", 0), _Service)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        yield server.server_address[1]
    finally:
        server.shutdown()
        subprocess.run(["ip", "addr", "del", f"{HOST_LO}/32", "dev", "lo"], check=False)


def exposed_daemon(daemon_factory, **env: str):
    """hatchd on the default exposure: API, proxy and SSH gateway on every host address."""
    d = daemon_factory(**env)
    d.env.update(
        HATCH_HTTP_ADDR=f"0.0.0.0:{d.port}",
        HATCH_PROXY_ADDR=f"0.0.0.0:{d.proxy_port}",
        HATCH_SSH_HOST="0.0.0.0",
    )
    d.start()
    return d


def via_proxy(hatch, subdomain: str, path: str) -> httpx.Response:
    return httpx.get(
        f"http://127.0.0.1:{hatch.proxy_port}{path}",
        headers={"Host": f"{subdomain}.hatch.local"},
        timeout=60,
    )


def test_a_guest_reaches_nothing_of_the_host(daemon_factory, outside, host_service) -> None:
    hatch = exposed_daemon(daemon_factory)
    gateway = f"{hatch.subnet}.1"
    with hatch.client(hatch.create_key("bob")) as bob:
        other = bob.create_vm(user_data=WEB_SERVER, mem_mib=256)  # another tenant's VM
    wait_http(f"http://{other['guest_ip']}:8080/")
    ssh_port = other["ssh_port"]
    wait_for(
        lambda: answers("127.0.0.1", ssh_port, greeting=SSH_HELLO).startswith(b"SSH-"),
        120,
        "bob's dropbear",
    )

    # Positive controls on the host's side: every listener the guest will try answers the host.
    assert answers(gateway, hatch.port).startswith(b"HTTP/1.1 ")
    assert answers(gateway, hatch.proxy_port).startswith(b"HTTP/1.1 ")
    assert answers(gateway, ssh_port, greeting=SSH_HELLO).startswith(b"SSH-")
    assert answers(HOST_UPLINK, hatch.port).startswith(b"HTTP/1.1 ")
    assert answers(HOST_LO, host_service).startswith(b"HTTP/1.0 200")
    assert answers(LAN, 80).startswith(b"HTTP/1.0 200")
    assert answers(METADATA, 80).startswith(b"HTTP/1.0 200")

    probes = probe_script(
        tcp={
            "public-first": (PUBLIC, 80),
            "api": (gateway, hatch.port),
            "proxy": (gateway, hatch.proxy_port),
            "ssh-gateway": (gateway, ssh_port),
            "api-on-uplink": (HOST_UPLINK, hatch.port),
            "service-on-loopback": (HOST_LO, host_service),
            "lan": (LAN, 80),
            "metadata": (METADATA, 80),
            "public-last": (PUBLIC, 80),
        },
        icmp={"ping-public": PUBLIC, "ping-gateway": gateway},
    )
    with hatch.client(hatch.create_key("alice")) as alice:
        guest = alice.create_vm(user_data=probes, mem_mib=256)
        route = alice.create_route(guest["id"], 8080)
    results = probe_results(guest["guest_ip"])  # the host reaches the guest: replies flow
    assert results == {
        "public-first": "reached",
        "api": "blocked",
        "proxy": "blocked",
        "ssh-gateway": "blocked",
        "api-on-uplink": "blocked",
        "service-on-loopback": "blocked",
        "lan": "blocked",
        "metadata": "blocked",
        "public-last": "reached",
        "ping-public": "reached",
        "ping-gateway": "blocked",
    }
    # Connections the host opens still get their replies: the proxy's and the SSH gateway's.
    assert "round 1" in via_proxy(hatch, route["subdomain"], "/probes").text
    assert answers("127.0.0.1", ssh_port, greeting=SSH_HELLO).startswith(b"SSH-")


def test_egress_policy_defaults_and_operator_lists(daemon_factory, outside) -> None:
    hatch = daemon_factory(
        HATCH_EGRESS_ALLOW_CIDRS=f"{MIRROR.rsplit('.', 1)[0]}.0/24",
        HATCH_EGRESS_DENY_CIDRS=f"{PUBLIC_DENIED}/32",
        HATCH_GUEST_DNS=DNS,
    )
    hatch.start()
    probes = probe_script(
        tcp={
            "public-first": (PUBLIC, 80),
            "operator-denied": (PUBLIC_DENIED, 80),
            "operator-allowed": (MIRROR, 80),
            "10/8": (LAN, 80),
            "172.16/12": (PRIVATE_172, 80),
            "192.168/16": (PRIVATE_192, 80),
            "100.64/10": (SHARED, 80),
            "169.254/16": (METADATA, 80),
            "dns": (DNS, 53),
            "dns-other-port": (DNS, 80),
            "public-last": (PUBLIC, 80),
        }
    )
    with hatch.client(hatch.create_key("alice")) as api:
        guest = api.create_vm(user_data=probes, mem_mib=256)
    assert probe_results(guest["guest_ip"]) == {
        "public-first": "reached",
        "operator-denied": "blocked",
        "operator-allowed": "reached",
        "10/8": "blocked",
        "172.16/12": "blocked",
        "192.168/16": "blocked",
        "100.64/10": "blocked",
        "169.254/16": "blocked",
        "dns": "reached",
        "dns-other-port": "blocked",
        "public-last": "reached",
    }
    assert guest["egress"] == "internet"  # the default


def test_egress_none_reaches_nothing_outside_but_is_reachable(daemon_factory, outside) -> None:
    hatch = daemon_factory(HATCH_GUEST_DNS=DNS)
    hatch.start()
    probes = probe_script(
        tcp={"public": (PUBLIC, 80), "dns": (DNS, 53)}, icmp={"ping-public": PUBLIC}, rounds=10_000
    )
    with hatch.client(hatch.create_key("alice")) as api:
        online = api.create_vm(user_data=probes, mem_mib=256)  # the positive control
        offline = api.create_vm(user_data=probes, mem_mib=256, egress="none")
        route = api.create_route(offline["id"], 8080)
    reached = dict.fromkeys(["public", "dns", "ping-public"], "reached")
    blocked = dict.fromkeys(reached, "blocked")
    assert probe_results(online["guest_ip"]) == reached
    assert probe_results(offline["guest_ip"]) == blocked  # read over HTTP from the host
    # The host still reaches it: through a route, and through the SSH gateway.
    assert "round" in via_proxy(hatch, route["subdomain"], "/probes").text
    assert answers("127.0.0.1", offline["ssh_port"], greeting=SSH_HELLO).startswith(b"SSH-")
    assert online["egress"] == "internet" and offline["egress"] == "none"

    # A daemon restart builds its tables afresh and puts every running guest's policy back.
    hatch.kill()
    hatch.start()
    with hatch.client(hatch.create_key("alice")) as api:
        assert api.get_vm(offline["id"])["egress"] == "none"
    # A round that began after the restart: the one after the round running now.
    for vm, expected in ((online, reached), (offline, blocked)):
        assert probe_results(vm["guest_ip"], after_round=latest_round(vm["guest_ip"]) + 1) == (
            expected
        )
