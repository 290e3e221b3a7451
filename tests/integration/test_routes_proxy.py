"""Routes and the wake-on-request proxy, with real guests behind them."""

from __future__ import annotations

import hashlib
import os
import re
import socket
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import pytest

from hatchvm.client import HatchAPIError
from tests.support.wait import wait_for, wait_http

pytestmark = pytest.mark.vm

WEB_SERVER = """#!/bin/sh
mkdir -p /srv/www
echo "hello from $(hostname)" > /srv/www/index.html
cat /proc/sys/kernel/random/boot_id > /srv/www/boot_id
busybox httpd -p 8080 -h /srv/www
"""


def via_proxy(hatch, subdomain: str, path: str = "/", timeout: float = 120) -> httpx.Response:
    return httpx.get(
        f"http://127.0.0.1:{hatch.proxy_port}{path}",
        headers={"Host": f"{subdomain}.hatch.local:{hatch.proxy_port}"},
        timeout=timeout,
    )


def restores_of(hatch, vm_id: str) -> int:
    return len(hatch.events("vm restored", vm_id))


def status_and_error(api, method: str, path: str, body: object) -> tuple[int, str]:
    response = api.request(method, path, json=body)
    return response.status_code, response.json().get("error", "")


@pytest.mark.postgres
def test_routes_api(api, hatch) -> None:
    vm = api.create_vm(user_data=WEB_SERVER, mem_mib=256)
    route = api.create_route(vm["id"], target_port=8080, subdomain="myapp")
    assert route["id"].startswith("rt_") and route["vm_id"] == vm["id"]
    assert route["subdomain"] == "myapp" and route["target_port"] == 8080
    assert route["auto_wake"] is True
    assert route["url"] == f"http://myapp.hatch.local:{hatch.proxy_port}"
    assert set(route) >= {"created_at", "updated_at"}
    generated = api.create_route(vm["id"], target_port=22, auto_wake=False)
    assert re.fullmatch(r"[a-z0-9]{12}", generated["subdomain"])
    assert generated["auto_wake"] is False
    listed = [r["id"] for r in api.list_routes(vm["id"])]
    assert listed == [generated["id"], route["id"]]  # newest first

    path = f"/vms/{vm['id']}/routes"
    cases = [
        ({"subdomain": "myapp", "target_port": 80}, 409, "already in use"),
        ({"subdomain": "api", "target_port": 80}, 400, "subdomain: 'api' is reserved"),
        ({"subdomain": "-bad", "target_port": 80}, 400, "subdomain: must not start or end"),
        ({"subdomain": "Upper", "target_port": 80}, 400, "subdomain: must be lowercase"),
        ({"subdomain": "a_b", "target_port": 80}, 400, "subdomain: may only contain"),
        ({"subdomain": "x" * 64, "target_port": 80}, 400, "at most 63"),
        ({"target_port": 0}, 400, "target_port"),
        ({"target_port": 65536}, 400, "target_port"),
        ({"target_port": "80"}, 400, "target_port"),
        ({"target_port": 80, "auto_wake": "yes"}, 400, "auto_wake"),
        ({"target_port": 80, "colour": 1}, 400, "colour: unknown field"),
        ({}, 400, "target_port: field required"),
    ]
    for body, status, message in cases:
        got = status_and_error(api, "POST", path, body)
        assert got[0] == status and message in got[1], (body, got)
    assert status_and_error(api, "POST", "/vms/vm_nope/routes", {"target_port": 80})[0] == 404

    with hatch.client(hatch.create_key("mallory")) as other:
        for call in (
            lambda: other.create_route(vm["id"], target_port=80),
            lambda: other.list_routes(vm["id"]),
            lambda: other.delete_route(route["id"]),
        ):
            with pytest.raises(HatchAPIError) as err:
                call()
            assert err.value.status == 404

    # Two creates of one name at once: the unique index decides, one 201 and one 409.
    with ThreadPoolExecutor(max_workers=2) as pool:
        raced = list(
            pool.map(
                lambda _: api.request("POST", path, json={"subdomain": "race", "target_port": 80}),
                range(2),
            )
        )
    assert sorted(r.status_code for r in raced) == [201, 409], [r.text for r in raced]
    assert "subdomain race is already in use" in next(r for r in raced if r.status_code == 409).text
    assert api.delete_route(next(r for r in raced if r.status_code == 201).json()["id"])

    assert api.delete_route(generated["id"]) == {"status": "deleted"}
    with pytest.raises(HatchAPIError) as err:
        api.delete_route(generated["id"])
    assert err.value.status == 404
    assert [r["id"] for r in api.list_routes(vm["id"])] == [route["id"]]


def test_proxy_forwards_and_reports_errors(api, hatch) -> None:
    vm = api.create_vm(user_data=WEB_SERVER, mem_mib=256)
    wait_http(f"http://{vm['guest_ip']}:8080/")
    api.create_route(vm["id"], target_port=8080, subdomain="web")
    api.create_route(vm["id"], target_port=9999, subdomain="closed")

    response = via_proxy(hatch, "web")
    assert response.status_code == 200
    assert response.text.strip() == f"hello from {vm['id'].replace('_', '-')}"
    missing = via_proxy(hatch, "web", "/nothing-here")
    assert missing.status_code == 404  # the guest's own 404, passed through

    for subdomain, status, message in (
        ("nosuch", 404, "no route for host"),
        ("closed", 502, "refused"),
    ):
        response = via_proxy(hatch, subdomain)
        assert response.status_code == status
        assert message in response.json()["error"]
    other_domain = httpx.get(
        f"http://127.0.0.1:{hatch.proxy_port}/", headers={"Host": "web.example.com"}
    )
    assert other_domain.status_code == 404 and "error" in other_domain.json()

    api.delete_vm(vm["id"])
    assert via_proxy(hatch, "web").status_code == 404  # its routes went with it


def test_concurrent_requests_share_one_wake(api, hatch) -> None:
    vm = api.create_vm(user_data=WEB_SERVER, mem_mib=256)
    boot = wait_http(f"http://{vm['guest_ip']}:8080/boot_id")
    api.create_route(vm["id"], target_port=8080, subdomain="sleepy")
    api.create_route(vm["id"], target_port=8080, subdomain="nowake", auto_wake=False)
    api.snapshot_vm(vm["id"])

    response = via_proxy(hatch, "nowake")
    assert response.status_code == 503 and "does not wake" in response.json()["error"]
    assert api.get_vm(vm["id"])["state"] == "snapshotted"

    # A client that gives up at once does not take the wake down with it.
    with socket.create_connection(("127.0.0.1", hatch.proxy_port)) as gone:
        gone.sendall(b"GET / HTTP/1.1\r\nHost: sleepy.hatch.local\r\n\r\n")
        wait_for(lambda: api.get_vm(vm["id"])["state"] != "snapshotted", 30, "the wake to start")
    wait_for(lambda: api.get_vm(vm["id"])["state"] == "running", 120, "the abandoned wake")
    assert restores_of(hatch, vm["id"]) == 1
    api.snapshot_vm(vm["id"])

    with ThreadPoolExecutor(max_workers=50) as pool:
        responses = list(pool.map(lambda _: via_proxy(hatch, "sleepy", "/boot_id"), range(50)))
    assert [r.status_code for r in responses] == [200] * 50
    assert {r.text for r in responses} == {boot}  # the same guest, resumed
    assert restores_of(hatch, vm["id"]) == 2  # one for the 50
    assert api.get_vm(vm["id"])["state"] == "running"


def test_request_cold_boots_a_stopped_vm(api, hatch) -> None:
    vm = api.create_vm(user_data=WEB_SERVER, mem_mib=256)
    first_boot = wait_http(f"http://{vm['guest_ip']}:8080/boot_id")
    api.create_route(vm["id"], target_port=8080, subdomain="cold")
    api.stop_vm(vm["id"])
    response = via_proxy(hatch, "cold", "/boot_id")
    assert response.status_code == 200
    assert response.text.strip() != first_boot.strip()  # a new boot
    wait_for(lambda: api.get_vm(vm["id"])["state"] == "running", 10, "running")


# CGI scripts for busybox httpd: a 100 MiB download made on the fly, and an upload digest.
TRANSFER_SERVER = """#!/bin/sh
mkdir -p /srv/www/cgi-bin
cat > /srv/www/cgi-bin/download <<'SCRIPT'
#!/bin/sh
printf 'Content-Type: application/octet-stream\\r\\n\\r\\n'
yes 0123456789abcdefghijklmnopqrstuvwxyz0123456789abcdefghijklmnopqrstuvwxyz | head -c 104857600
SCRIPT
cat > /srv/www/cgi-bin/upload <<'SCRIPT'
#!/bin/sh
printf 'Content-Type: text/plain\\r\\n\\r\\n'
head -c "$CONTENT_LENGTH" | md5sum | cut -d' ' -f1
SCRIPT
chmod +x /srv/www/cgi-bin/*
echo ready > /srv/www/ready
busybox httpd -p 8080 -h /srv/www
"""
LINE = b"0123456789abcdefghijklmnopqrstuvwxyz" * 2 + b"\n"
HUNDRED_MIB = 100 << 20


def peak_rss_kib(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1])
    raise AssertionError("no VmHWM")


def test_large_streams_through_the_proxy_keep_its_memory_bounded(api, hatch) -> None:
    vm = api.create_vm(user_data=TRANSFER_SERVER, mem_mib=256)
    wait_http(f"http://{vm['guest_ip']}:8080/ready")
    api.create_route(vm["id"], target_port=8080, subdomain="bulk")
    assert hatch.proc is not None
    before = peak_rss_kib(hatch.proc.pid)
    host = {"Host": "bulk.hatch.local"}
    url = f"http://127.0.0.1:{hatch.proxy_port}/cgi-bin/"

    expected = hashlib.md5()
    whole, rest = divmod(HUNDRED_MIB, len(LINE))
    received = hashlib.md5()
    size = 0
    with httpx.stream("GET", url + "download", headers=host, timeout=600) as response:
        assert response.status_code == 200
        for chunk in response.iter_raw():
            received.update(chunk)
            size += len(chunk)
    for _ in range(whole):
        expected.update(LINE)
    expected.update(LINE[:rest])
    assert size == HUNDRED_MIB and received.hexdigest() == expected.hexdigest()

    block = os.urandom(1 << 20)
    sent = hashlib.md5()

    def body():
        for _ in range(100):
            sent.update(block)
            yield block

    response = httpx.post(
        url + "upload",
        content=body(),
        headers={**host, "Content-Length": str(HUNDRED_MIB)},
        timeout=600,
    )
    assert response.status_code == 200
    assert response.text.strip() == sent.hexdigest()
    grown_mib = (peak_rss_kib(hatch.proc.pid) - before) / 1024
    assert grown_mib < 64, f"hatchd grew by {grown_mib:.0f} MiB moving 2 x 100 MiB"
