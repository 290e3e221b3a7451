"""Routes and the wake-on-request proxy, with real guests behind them."""

from __future__ import annotations

import json
import re
from concurrent.futures import ThreadPoolExecutor

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


@pytest.fixture
def hatch(daemon_factory):
    d = daemon_factory()
    d.start()
    return d


@pytest.fixture
def api(hatch):
    with hatch.client(hatch.create_key("alice")) as client:
        yield client


def via_proxy(hatch, subdomain: str, path: str = "/", timeout: float = 120) -> httpx.Response:
    return httpx.get(
        f"http://127.0.0.1:{hatch.proxy_port}{path}",
        headers={"Host": f"{subdomain}.hatch.local:{hatch.proxy_port}"},
        timeout=timeout,
    )


def restores_of(hatch, vm_id: str) -> int:
    count = 0
    for line in hatch.log_path.read_text().splitlines():
        try:
            entry = json.loads(line)
        except ValueError:
            continue
        if entry.get("event") == "vm restored" and entry.get("vm_id") == vm_id:
            count += 1
    return count


def status_and_error(api, method: str, path: str, body: object) -> tuple[int, str]:
    response = api.request(method, path, json=body)
    return response.status_code, response.json().get("error", "")


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

    with ThreadPoolExecutor(max_workers=50) as pool:
        responses = list(pool.map(lambda _: via_proxy(hatch, "sleepy", "/boot_id"), range(50)))
    assert [r.status_code for r in responses] == [200] * 50
    assert {r.text for r in responses} == {boot}  # the same guest, resumed
    assert restores_of(hatch, vm["id"]) == 1
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
