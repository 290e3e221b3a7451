"""Forks of real guests: two children of a running VM side by side, each at its own address,
route and SSH port with its own host keys, machine id and random numbers, from the parent's
exact memory and disk; the parent unchanged and running on; children of a snapshotted VM and
of a stored snapshot; another user's VM and snapshot 404; counts and quotas."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import pytest

from hatchvm.client import HatchAPIError, HatchClient
from tests.support.daemon import HatchDaemon
from tests.support.ssh import host_key
from tests.support.wait import wait_http

pytestmark = pytest.mark.vm

# A web server whose CGI says who answers: hostname, address, 16 fresh random bytes, the
# machine id, and what the guest keeps in memory (/tmp is tmpfs) and on its disk (/root).
WHO = r"""#!/bin/sh
mkdir -p /srv/www/cgi-bin
cat > /srv/www/cgi-bin/who <<'EOF'
#!/bin/sh
printf 'Content-Type: text/plain\r\n\r\n'
echo "name=$(hostname)"
echo "addr=$(ip -4 -o addr show dev eth0 | awk '{print $4}')"
echo "random=$(head -c 16 /dev/urandom | od -An -tx1 | tr -d ' \n')"
echo "machine=$(cat /etc/machine-id 2>/dev/null)"
echo "memory=$(cat /tmp/in-memory 2>/dev/null)"
echo "disk=$(cat /root/on-disk 2>/dev/null)"
EOF
chmod 755 /srv/www/cgi-bin/who
busybox httpd -p 8080 -h /srv/www
"""


@dataclass
class World:
    hatch: HatchDaemon
    alice: HatchClient
    bob: HatchClient
    parent: dict[str, Any]


@pytest.fixture(scope="module")
def world() -> Iterator[World]:
    hatch = HatchDaemon(HATCH_STOP_TIMEOUT="5", HATCH_MAX_VMS_PER_USER="6")
    try:
        hatch.start()
        alice = hatch.client(hatch.create_key("alice"))
        bob = hatch.client(hatch.create_key("bob"))
        parent = alice.create_vm(mem_mib=256, user_data=WHO)
        wait_http(f"http://{parent['guest_ip']}:8080/cgi-bin/who")
        yield World(hatch, alice, bob, parent)
        alice.close()
        bob.close()
    finally:
        hatch.cleanup()


def who(ip: str) -> dict[str, str]:
    text = wait_http(f"http://{ip}:8080/cgi-bin/who", timeout=60)
    return dict(line.split("=", 1) for line in text.strip().splitlines())


def status_of(call: Any) -> tuple[int, str]:
    try:
        call()
    except HatchAPIError as exc:
        return exc.status, exc.message
    return 200, ""


def test_two_forks_of_a_running_vm_side_by_side(world: World, tmp_path: Path) -> None:
    api, parent = world.alice, world.parent
    api.exec(parent["id"], "echo before-fork > /tmp/in-memory; echo on-disk > /root/on-disk; sync")
    before = who(parent["guest_ip"])
    parent_key = host_key(parent["ssh_port"], tmp_path)
    carrier = ["cat", "/sys/class/net/eth0/carrier_changes"]
    parent_carrier = api.exec(parent["id"], carrier)["stdout"]

    children = api.fork_vm(parent["id"], count=2)

    assert len(children) == 2 and all(c["state"] == "running" for c in children)
    identities = [(c["id"], c["guest_ip"], c["guest_mac"], c["ssh_port"]) for c in children]
    identities.append((parent["id"], parent["guest_ip"], parent["guest_mac"], parent["ssh_port"]))
    for field in range(4):
        assert len({i[field] for i in identities}) == 3, identities
    seen = [who(c["guest_ip"]) for c in children]
    for child, answer in zip(children, seen, strict=True):
        assert answer["name"] == child["id"].replace("_", "-")
        assert answer["addr"] == f"{child['guest_ip']}/24"
        # The parent's exact memory and disk at the fork.
        assert (answer["memory"], answer["disk"]) == ("before-fork", "on-disk")
    # Unplugged on the host's side only: the guest never saw its link go down and up (its
    # kernel would have dropped what it sent until it noticed, such as a first answer).
    for child in children:
        assert api.exec(child["id"], carrier)["stdout"] == parent_carrier
    # Reseeded: no two share random numbers, or a machine id.
    assert len({a["random"] for a in [*seen, before]}) == 3
    assert len({a["machine"] for a in [*seen, before]}) == 3

    # Each its own SSH host keys (not the parent's, not its sibling's).
    keys = {host_key(c["ssh_port"], tmp_path) for c in children}
    assert len(keys | {parent_key}) == 3

    # Each through its own route.
    for child in children:
        route = api.create_route(child["id"], 8080)
        response = httpx.get(
            f"http://127.0.0.1:{world.hatch.proxy_port}/cgi-bin/who",
            headers={"Host": f"{route['subdomain']}.hatch.local"},
            timeout=60,
        )
        assert response.status_code == 200
        assert f"name={child['id'].replace('_', '-')}" in response.text

    # The parent ran on unchanged, and what it writes now no child sees.
    assert api.get_vm(parent["id"])["state"] == "running"
    after = who(parent["guest_ip"])
    assert (after["name"], after["addr"], after["machine"]) == (
        before["name"],
        before["addr"],
        before["machine"],
    )
    assert host_key(parent["ssh_port"], tmp_path) == parent_key
    api.exec(parent["id"], "echo after-fork > /tmp/in-memory; echo changed > /root/on-disk")
    for child in children:
        answer = who(child["guest_ip"])
        assert (answer["memory"], answer["disk"]) == ("before-fork", "on-disk")
    # A child writes only its own memory.
    api.exec(children[0]["id"], "echo child > /tmp/in-memory")
    assert who(children[1]["guest_ip"])["memory"] == "before-fork"
    assert who(parent["guest_ip"])["memory"] == "after-fork"
    for child in children:
        api.delete_vm(child["id"])
    assert api.exec(parent["id"], ["cat", "/tmp/in-memory"])["stdout"] == "after-fork\n"


def test_forks_of_a_snapshotted_vm_and_of_a_stored_snapshot(world: World) -> None:
    api = world.alice
    vm = api.create_vm(mem_mib=256, user_data=WHO)
    wait_http(f"http://{vm['guest_ip']}:8080/cgi-bin/who")
    api.exec(vm["id"], "echo first > /tmp/in-memory")
    first = api.snapshot_vm(vm["id"])
    api.restore_vm(vm["id"])
    api.exec(vm["id"], "echo second > /tmp/in-memory")
    api.snapshot_vm(vm["id"])

    (child,) = api.fork_vm(vm["id"])  # from its latest snapshot
    assert api.get_vm(vm["id"])["state"] == "snapshotted"  # the parent sleeps on
    assert who(child["guest_ip"])["memory"] == "second"
    (older,) = api.fork_snapshot(first["id"])  # from the store
    answer = who(older["guest_ip"])
    assert answer["memory"] == "first" and answer["name"] == older["id"].replace("_", "-")

    # A child sleeps and wakes like any VM (its RAM goes into its snapshot)...
    api.exec(older["id"], "echo changed > /tmp/in-memory; echo kept > /root/on-disk")
    api.snapshot_vm(older["id"])
    assert api.exec(older["id"], ["cat", "/tmp/in-memory"])["stdout"] == "changed\n"
    # ... and boots cold like any VM: as itself, its disk kept, its memory fresh.
    api.stop_vm(older["id"])
    api.start_vm(older["id"])
    answer = who(older["guest_ip"])
    assert answer["name"] == older["id"].replace("_", "-")
    assert (answer["memory"], answer["disk"]) == ("", "kept")
    # The parent wakes as it slept, with memory of its own: the child never sees its writes.
    assert api.exec(vm["id"], ["cat", "/tmp/in-memory"])["stdout"] == "second\n"
    api.exec(vm["id"], "echo third > /tmp/in-memory")
    assert who(child["guest_ip"])["memory"] == "second"
    for v in (child, older, vm):
        api.delete_vm(v["id"])


def test_another_users_vm_or_snapshot_is_404_and_counts_are_checked(world: World) -> None:
    alice, bob, parent = world.alice, world.bob, world.parent
    vms_before = len(alice.list_vms())
    snap = alice.snapshot_vm(parent["id"])
    assert status_of(lambda: bob.fork_vm(parent["id"])) == (404, f"vm {parent['id']} not found")
    assert status_of(lambda: bob.fork_snapshot(snap["id"])) == (
        404,
        f"snapshot {snap['id']} not found",
    )
    assert bob.list_vms() == [] and len(alice.list_vms()) == vms_before
    assert status_of(lambda: alice.fork_vm(parent["id"], count=0))[0] == 400
    assert status_of(lambda: alice.fork_vm(parent["id"], count=17))[0] == 400
    # Quota (6 VMs): the parent and 5 more at most.
    status, message = status_of(lambda: alice.fork_vm(parent["id"], count=6))
    assert (status, message) == (403, "vm limit reached (6/6)")
    assert len(alice.list_vms()) == vms_before  # nothing left behind
    # Positive control: the owner forks the same snapshot (with the CLI).
    env = {
        **os.environ,
        "HATCH_API_URL": world.hatch.url,
        "HATCH_API_KEY": alice._http.headers["Authorization"].split()[-1],
    }
    done = subprocess.run(
        [sys.executable, "-m", "hatchvm.cli.main", "vm", "fork", snap["id"], "--json"],
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert done.returncode == 0, done.stderr
    (child,) = json.loads(done.stdout)
    assert who(child["guest_ip"])["name"] == child["id"].replace("_", "-")
    alice.delete_vm(child["id"])
    alice.restore_vm(parent["id"])
