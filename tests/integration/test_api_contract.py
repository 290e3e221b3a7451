"""The contract's status codes and messages, against a real hatchd."""

from __future__ import annotations

import concurrent.futures
import json
import subprocess

import httpx
import pytest

from tests.support.wait import wait_for

pytestmark = pytest.mark.vm


@pytest.fixture
def hatch(daemon_factory):
    d = daemon_factory(HATCH_MAX_VMS_PER_USER="2")
    d.start()
    return d


@pytest.fixture
def key(hatch) -> str:
    return hatch.create_key("alice")


def call(hatch, method: str, path: str, key: str | None = None, **kwargs) -> httpx.Response:
    headers = kwargs.pop("headers", {})
    if key:
        headers["Authorization"] = f"Bearer {key}"
    return httpx.request(method, hatch.url + path, headers=headers, timeout=180, **kwargs)


def error_of(response: httpx.Response) -> str:
    body = response.json()
    assert set(body) == {"error"}, body
    return body["error"]


@pytest.mark.parametrize(
    ("body", "field", "fragment"),
    [
        ('{"vcpu_count": 0}', "vcpu_count", "greater than or equal to 1"),
        ('{"vcpu_count": 33}', "vcpu_count", "less than or equal to 32"),
        ('{"mem_mib": 64}', "mem_mib", "greater than or equal to 128"),
        ('{"mem_mib": 70000}', "mem_mib", "less than or equal to 65536"),
        ('{"vcpu_count": "2"}', "vcpu_count", "valid integer"),
        ('{"vcpu_count": 1.5}', "vcpu_count", "valid integer"),
        ('{"enable_network": "yes"}', "enable_network", "valid boolean"),
        ('{"user_data": 5}', "user_data", "valid string"),
        ('{"colour": "blue"}', "colour", "unknown field"),
        ('{"boot_args": "hatch.ip=1.2.3.4"}', "boot_args", "set by hatchd"),
        ('{"egress": "off"}', "egress", "'internet' or 'none'"),
        ('{"egress": "internet", "enable_network": false}', "egress", "needs a network"),
    ],
)
def test_bad_create_bodies_are_400_naming_the_field(hatch, key, body, field, fragment) -> None:
    r = call(hatch, "POST", "/vms", key, content=body, headers={"Content-Type": "application/json"})
    assert r.status_code == 400
    message = error_of(r)
    assert message.startswith(f"{field}: ") and fragment in message, message


def test_invalid_json_and_non_object(hatch, key) -> None:
    r = call(hatch, "POST", "/vms", key, content="{not json")
    assert r.status_code == 400 and error_of(r).startswith("invalid JSON body")
    r = call(hatch, "POST", "/vms", key, content="[1, 2]")
    assert r.status_code == 400 and error_of(r) == "body must be a JSON object"


def test_hostile_bodies_are_400_and_make_nothing(hatch, key) -> None:
    """Regressions: each of these was a 500 (the last two after creating a VM in error)."""
    bomb = "#cloud-config\nruncmd:\n - &a " + "y" * 50_000 + "\n" + " - *a\n" * 1000
    cases = [
        ('{"vcpu_count": 1' + "0" * 5000 + "}", "invalid JSON body: Exceeds the limit"),
        ("[" * 100_000 + "]" * 100_000, "invalid JSON body: nested too deeply"),
        (  # a YAML escape: JSON itself cannot carry a lone surrogate past pydantic
            json.dumps({"user_data": '#cloud-config\nruncmd: ["\\ud800"]'}),
            "user_data: must not contain lone surrogates",
        ),
        (json.dumps({"user_data": bomb}), "user_data: runcmd expands to over 256 KiB"),
    ]
    for body, message in cases:
        r = call(hatch, "POST", "/vms", key, content=body)
        assert r.status_code == 400 and error_of(r).startswith(message), r.text[:300]
    assert call(hatch, "GET", "/vms", key).json() == []


def test_bad_user_data_is_400(hatch, key) -> None:
    r = call(hatch, "POST", "/vms", key, json={"user_data": "echo no shebang"})
    assert r.status_code == 400 and error_of(r).startswith("user_data: ")


def test_unknown_image_is_400(hatch, key) -> None:
    r = call(hatch, "POST", "/vms", key, json={"image_id": "img_nope"})
    assert r.status_code == 400 and error_of(r) == "image_id: image img_nope not found"


def test_authentication(hatch, key) -> None:
    r = call(hatch, "GET", "/vms")
    assert r.status_code == 401 and "missing API key" in error_of(r)
    r = call(hatch, "GET", "/vms", "hatch_wrong")
    assert r.status_code == 401 and error_of(r) == "invalid API key"
    r = call(hatch, "GET", "/vms", headers={"X-API-Key": key})
    assert r.status_code == 200 and r.json() == []
    assert call(hatch, "GET", "/healthz").json()["status"] == "ok"


def test_revoked_key_is_refused(hatch, key) -> None:
    import asyncio

    from hatchvm import admin

    keys = asyncio.run(admin.list_keys(hatch.settings()))
    assert call(hatch, "GET", "/vms", key).status_code == 200
    asyncio.run(admin.revoke_key(hatch.settings(), keys[0].id))
    assert call(hatch, "GET", "/vms", key).status_code == 401


@pytest.mark.postgres
def test_unknown_paths_and_methods(hatch, key) -> None:
    r = call(hatch, "GET", "/vms/vm_doesnotexist", key)
    assert r.status_code == 404 and error_of(r) == "vm vm_doesnotexist not found"
    r = call(hatch, "POST", "/vms/vm_doesnotexist/stop", key)
    assert r.status_code == 404
    r = call(hatch, "GET", "/nowhere", key)
    assert r.status_code == 404 and error_of(r) == "not found"
    r = call(hatch, "PUT", "/vms", key)
    assert r.status_code == 405 and error_of(r) == "method not allowed"
    r = call(hatch, "GET", "/vms/vm_x/stop", key)
    assert r.status_code == 405
    r = call(hatch, "GET", "/images/img_nope", key)
    assert r.status_code == 404 and error_of(r) == "image img_nope not found"
    # No row can hold a NUL (PostgreSQL refuses it in text): absent, not a 500.
    for path in ("/vms/vm_%00", "/snapshots/snap_%00", "/images/img_%00", "/vms/vm_%00/routes"):
        assert call(hatch, "GET", path, key).status_code == 404, path
    assert call(hatch, "DELETE", "/routes/rt_%00", key).status_code == 404


@pytest.mark.postgres
def test_images_listed(hatch, key) -> None:
    images = call(hatch, "GET", "/images", key).json()
    assert [i["id"] for i in images] == ["img_default"]
    one = call(hatch, "GET", "/images/img_default", key).json()
    assert set(one) >= {"id", "kernel_path", "rootfs_path", "boot_args", "created_at"}
    assert one["created_at"].endswith("Z")


@pytest.mark.postgres
def test_quota_isolation_and_conflicts(hatch, key) -> None:
    bob = hatch.create_key("bob")
    small = {"enable_network": False, "mem_mib": 128}
    # Three concurrent creates against a quota of two: exactly two succeed.
    with concurrent.futures.ThreadPoolExecutor(3) as pool:
        results = list(pool.map(lambda _: call(hatch, "POST", "/vms", key, json=small), range(3)))
    codes = sorted(r.status_code for r in results)
    assert codes == [201, 201, 403], [r.text for r in results]
    denied = next(r for r in results if r.status_code == 403)
    assert error_of(denied) == "vm limit reached (2/2)"
    vm = next(r.json() for r in results if r.status_code == 201)
    # Bob sees none of alice's VMs and cannot touch them.
    assert call(hatch, "GET", "/vms", bob).json() == []
    for method, path in [("GET", ""), ("POST", "/stop"), ("DELETE", "")]:
        r = call(hatch, method, f"/vms/{vm['id']}{path}", bob)
        assert r.status_code == 404, (method, path, r.text)
    # Two stops at once on one VM: one wins, the other sees the new state.
    with concurrent.futures.ThreadPoolExecutor(2) as pool:
        stops = list(
            pool.map(lambda _: call(hatch, "POST", f"/vms/{vm['id']}/stop", key), range(2))
        )
    assert sorted(r.status_code for r in stops) == [200, 409]
    conflict = next(r for r in stops if r.status_code == 409)
    assert error_of(conflict) == "vm is stopped, must be running"
    r = call(hatch, "POST", f"/vms/{vm['id']}/start", key)
    assert r.status_code == 200 and r.json()["state"] == "running"
    r = call(hatch, "POST", f"/vms/{vm['id']}/start", key)
    assert r.status_code == 409 and error_of(r) == "vm is running, must be stopped"


@pytest.mark.postgres
def test_failed_create_leaves_only_an_error_row(daemon_factory) -> None:
    hatch = daemon_factory(HATCH_QEMU_BIN="/bin/false", HATCH_QEMU_ACCEL="tcg")
    hatch.start()
    key = hatch.create_key("alice")
    r = call(hatch, "POST", "/vms", key, json={"mem_mib": 128})
    assert r.status_code == 500
    message = error_of(r)
    assert message.startswith("creating vm_") and "failed" in message
    vms = call(hatch, "GET", "/vms", key).json()
    assert len(vms) == 1
    vm = vms[0]
    assert vm["state"] == "error" and vm["state_reason"]
    assert vm["guest_ip"] is None and vm["ssh_port"] is None
    assert not (hatch.data_dir / "vms" / vm["id"]).exists()
    links = subprocess.run(["ip", "-o", "link"], capture_output=True, text=True).stdout
    assert f": {hatch.tap_prefix}" not in links
    # The error row can be deleted like any VM.
    assert call(hatch, "DELETE", f"/vms/{vm['id']}", key).json() == {"status": "deleted"}
    wait_for(lambda: call(hatch, "GET", "/vms", key).json() == [], 5, "the list to empty")
