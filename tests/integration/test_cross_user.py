"""One user cannot see or touch another's VMs, snapshots or routes, by id or by listing.

Alice owns a running VM that serves HTTP through a route and has a snapshot, and a second VM
asleep in a snapshot. Bob tries every endpoint on them: each answer is the 404 an unknown id
gets, word for word (never 403 or 409, which would tell him the thing exists), and Alice's
things are intact and working afterwards. Each target is in a state where its owner's call
would be allowed, so a missing ownership check would show as a success, not hide behind a 409.
"""

from __future__ import annotations

import re
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import httpx
import pytest

from hatchvm.client import HatchClient
from hatchvm.core.states import ALLOWED, Op, State
from tests.support.daemon import HatchDaemon
from tests.support.wait import wait_for

pytestmark = pytest.mark.vm

WEB_SERVER = """#!/bin/sh
mkdir -p /srv/www
echo "hello from $(hostname)" > /srv/www/index.html
busybox httpd -p 8080 -h /srv/www
"""
SUBDOMAIN = "alice-app"


@dataclass
class World:
    hatch: HatchDaemon
    alice: HatchClient
    bob: HatchClient
    ids: dict[str, str]  # what the calls below name: Alice's things, and Bob's own VM
    alice_view: dict[str, Any]  # Alice's listings before Bob's attempts


def via_proxy(hatch: HatchDaemon, subdomain: str) -> httpx.Response:
    return httpx.get(
        f"http://127.0.0.1:{hatch.proxy_port}/",
        headers={"Host": f"{subdomain}.hatch.local:{hatch.proxy_port}"},
        timeout=120,
    )


def serves(hatch: HatchDaemon, vm_id: str) -> bool:
    response = via_proxy(hatch, SUBDOMAIN)
    return response.status_code == 200 and vm_id.replace("_", "-") in response.text


def alice_view(alice: HatchClient, ids: dict[str, str]) -> dict[str, Any]:
    def stable(objects: list[dict[str, Any]]) -> list[dict[str, Any]]:
        return [{k: v for k, v in o.items() if k != "updated_at"} for o in objects]

    return {
        "vms": stable(alice.list_vms()),
        "snapshots": [stable(alice.list_snapshots(ids[k])) for k in ("vm", "asleep")],
        "routes": stable(alice.list_routes(ids["vm"])),
    }


@pytest.fixture(scope="module")
def world() -> Iterator[World]:
    hatch = HatchDaemon(HATCH_STOP_TIMEOUT="5")
    try:
        hatch.start()
        alice = hatch.client(hatch.create_key("alice"))
        bob = hatch.client(hatch.create_key("bob"))
        vm = alice.create_vm(user_data=WEB_SERVER, mem_mib=256)
        route = alice.create_route(vm["id"], target_port=8080, subdomain=SUBDOMAIN)
        wait_for(lambda: serves(hatch, vm["id"]), 180, "alice's VM to serve through its route")
        snap = alice.snapshot_vm(vm["id"], wait_stored=True)
        alice.restore_vm(vm["id"])
        asleep = alice.create_vm(enable_network=False, mem_mib=128)
        asleep_snap = alice.snapshot_vm(asleep["id"], wait_stored=True)
        own = bob.create_vm(enable_network=False, mem_mib=128)
        own_snap = bob.snapshot_vm(own["id"], wait_stored=True)
        ids = {
            "vm": vm["id"],
            "snap": snap["id"],
            "route": route["id"],
            "subdomain": SUBDOMAIN,
            "asleep": asleep["id"],
            "asleep_snap": asleep_snap["id"],
            "own": own["id"],
            "own_snap": own_snap["id"],
        }
        yield World(hatch, alice, bob, ids, alice_view(alice, ids))
        alice.close()
        bob.close()
    finally:
        hatch.cleanup()


# (method, path, body, the VM whose state must allow the call for its owner, if any)
CALLS: list[tuple[str, str, dict[str, Any] | None, tuple[str, Op] | None]] = [
    ("GET", "/vms/{vm}", None, None),
    ("POST", "/vms/{vm}/stop", None, ("vm", Op.STOP)),
    ("POST", "/vms/{vm}/snapshot", None, ("vm", Op.SNAPSHOT)),
    ("POST", "/vms/{vm}/start", None, None),  # running: a leak would show as 409
    ("POST", "/vms/{asleep}/restore", None, ("asleep", Op.RESTORE)),
    ("POST", "/vms/{asleep}/restore", {"snapshot_id": "{asleep_snap}"}, ("asleep", Op.RESTORE)),
    ("POST", "/vms/{vm}/restore", {"snapshot_id": "{snap}"}, None),
    ("DELETE", "/vms/{vm}", None, ("vm", Op.DELETE)),
    ("DELETE", "/vms/{asleep}", None, ("asleep", Op.DELETE)),
    ("GET", "/vms/{vm}/snapshots", None, None),
    ("GET", "/vms/{asleep}/snapshots", None, None),
    ("GET", "/vms/{vm}/routes", None, None),
    ("POST", "/vms/{vm}/routes", {"target_port": 8080}, None),
    ("POST", "/vms/{vm}/routes", {"target_port": 8080, "subdomain": "bob-on-alice"}, None),
    ("GET", "/snapshots/{snap}", None, None),
    ("DELETE", "/snapshots/{snap}", None, None),
    ("GET", "/snapshots/{asleep_snap}", None, None),
    ("DELETE", "/snapshots/{asleep_snap}", None, None),  # Alice would get 409: her only way back
    ("DELETE", "/routes/{route}", None, None),
    # Bob's own VM, with Alice's snapshot: a snapshot is found only among the VM's own.
    ("POST", "/vms/{own}/restore", {"snapshot_id": "{snap}"}, None),
    ("POST", "/vms/{own}/restore", {"snapshot_id": "{asleep_snap}"}, None),
]

UNKNOWN = {  # ids of the same shape that name nothing: what Bob must not be able to tell apart
    "vm": "vm_000000000000",
    "snap": "snap_000000000000",
    "route": "rt_000000000000",
    "asleep": "vm_111111111111",
    "asleep_snap": "snap_111111111111",
}


def fill(template: Any, ids: dict[str, str]) -> Any:
    if isinstance(template, str):
        return re.sub(r"\{(\w+)\}", lambda m: ids[m.group(1)], template)
    if isinstance(template, dict):
        return {k: fill(v, ids) for k, v in template.items()}
    return template


def call_id(call: tuple[Any, ...]) -> str:
    method, path, body, _ = call
    return f"{method} {path}" + (f" {body}" if body else "")


@pytest.mark.parametrize("call", CALLS, ids=[call_id(c) for c in CALLS])
def test_bob_gets_404_for_alices_things(world: World, call: tuple[Any, ...]) -> None:
    method, path, body, allowed_for_owner = call
    if allowed_for_owner is not None:  # the owner could do it right now
        key, op = allowed_for_owner
        assert State(world.alice.get_vm(world.ids[key])["state"]) in ALLOWED[op]

    response = world.bob.request(method, fill(path, world.ids), json=fill(body, world.ids))
    assert response.status_code == 404, response.text
    # Word for word what a made-up id gets, once the ids in it are swapped.
    unknown_ids = {**world.ids, **UNKNOWN}
    control = world.bob.request(method, fill(path, unknown_ids), json=fill(body, unknown_ids))
    assert control.status_code == 404
    message = response.json()["error"]
    for name, made_up in UNKNOWN.items():
        message = message.replace(world.ids[name], made_up)
    assert response.json().keys() == {"error"} and message == control.json()["error"]

    # Nothing of Alice's moved.
    assert alice_view(world.alice, world.ids) == world.alice_view


@pytest.mark.parametrize("path", ["/vms", "/vms/{own}/snapshots", "/vms/{own}/routes"])
def test_bob_lists_only_his_own(world: World, path: str) -> None:
    listed = world.bob.request("GET", fill(path, world.ids)).json()
    alices = {v for k, v in world.ids.items() if k not in ("own", "own_snap")}
    assert not alices & {o["id"] for o in listed}
    assert not alices & {o.get("vm_id") for o in listed}
    expected = {"/vms": [world.ids["own"]], "/vms/{own}/snapshots": [world.ids["own_snap"]]}
    assert [o["id"] for o in listed] == expected.get(path, [])


def test_bob_can_do_the_same_to_his_own(world: World) -> None:
    """Positive control: Bob's key works, and the calls that failed on Alice's ids work on his."""
    own = world.ids["own"]
    assert world.bob.get_vm(own)["state"] == "snapshotted"
    assert world.bob.get_snapshot(world.ids["own_snap"])["vm_id"] == own
    restored = world.bob.restore_vm(own, world.ids["own_snap"])
    assert restored["state"] == "running"
    assert world.bob.stop_vm(own)["state"] == "stopped"
    assert world.bob.delete_vm(own) == {"status": "deleted"}


def test_alices_things_are_intact_and_working(world: World) -> None:
    alice, ids, hatch = world.alice, world.ids, world.hatch
    assert alice_view(alice, ids) == world.alice_view
    assert alice.get_vm(ids["vm"])["state"] == "running"
    assert alice.get_vm(ids["asleep"])["state"] == "snapshotted"
    wait_for(lambda: serves(hatch, ids["vm"]), 60, "the route to still reach alice's VM")
    # Her first snapshot still restores (by id, after a newer one), and the route follows.
    alice.snapshot_vm(ids["vm"], wait_stored=True)
    assert alice.restore_vm(ids["vm"], ids["snap"])["state"] == "running"
    wait_for(lambda: serves(hatch, ids["vm"]), 120, "alice's VM to serve after the restore")
    assert alice.restore_vm(ids["asleep"], ids["asleep_snap"])["state"] == "running"
