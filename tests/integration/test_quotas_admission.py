"""Per-user totals (403 naming the limit) against a real hatchd and real guests."""

from __future__ import annotations

import json
from typing import Any

import pytest

from hatchvm.client import HatchAPIError
from tests.integration.test_routes_proxy import WEB_SERVER, via_proxy
from tests.support.wait import wait_for, wait_http

pytestmark = pytest.mark.vm

SMALL = {"enable_network": False, "mem_mib": 128}


def refused(call, *args, **kwargs) -> HatchAPIError:
    with pytest.raises(HatchAPIError) as err:
        call(*args, **kwargs)
    return err.value


def logged(hatch, event: str, vm_id: str) -> dict[str, Any] | None:
    """hatchd's first log record of event about vm_id (its log is JSON lines)."""
    for line in hatch.log_path.read_text().splitlines():
        if line.startswith("{"):
            record = json.loads(line)
            if record.get("event") == event and record.get("vm_id") == vm_id:
                return record
    return None


def test_per_user_totals_are_refused_naming_the_limit(daemon_factory) -> None:
    hatch = daemon_factory(
        HATCH_MAX_VCPUS_PER_USER="3",
        HATCH_MAX_MEM_MIB_PER_USER="512",
        HATCH_VM_DISK_MIB="128",
        HATCH_MAX_DISK_MIB_PER_USER="256",
    )
    hatch.start()
    with hatch.client(hatch.create_key("alice")) as alice:
        alice.create_vm(enable_network=False, mem_mib=256)
        err = refused(alice.create_vm, enable_network=False, mem_mib=128, vcpu_count=3)
        assert (err.status, err.message) == (403, "vcpu limit reached: 1 + 3 > 3")
        err = refused(alice.create_vm, enable_network=False, mem_mib=384)
        assert (err.status, err.message) == (403, "memory limit reached: 256 + 384 MiB > 512 MiB")
        alice.create_vm(**SMALL)  # exactly at the disk limit: 2 x 128 MiB
        err = refused(alice.create_vm, **SMALL)
        assert (err.status, err.message) == (403, "disk limit reached: 256 + 128 MiB > 256 MiB")
        assert len(alice.list_vms()) == 2  # refusals leave nothing behind
    with hatch.client(hatch.create_key("bob")) as bob:
        assert bob.create_vm(enable_network=False, mem_mib=256)["state"] == "running"


def test_snapshot_storage_limit_manual_and_automatic(daemon_factory) -> None:
    hatch = daemon_factory(
        HATCH_MAX_SNAPSHOT_MIB_PER_USER="1",
        HATCH_IDLE_CHECK_INTERVAL="1",
        HATCH_IDLE_TIMEOUT="5",
    )
    hatch.start()
    with hatch.client(hatch.create_key("alice")) as alice:
        vm = alice.create_vm(user_data=WEB_SERVER, mem_mib=256)
        wait_http(f"http://{vm['guest_ip']}:8080/")
        alice.create_route(vm["id"], target_port=8080, subdomain="sleepy")
        # Under the limit the reaper freezes the idle VM (the positive control)...
        wait_for(lambda: alice.get_vm(vm["id"])["state"] == "snapshotted", 120, "idle snapshot")
        [snap] = alice.list_snapshots(vm["id"])
        assert snap["size_bytes"] > 1 << 20
        assert via_proxy(hatch, "sleepy").status_code == 200  # woken
        # ...which takes alice past 1 MiB: no more snapshots, by hand or by the reaper.
        err = refused(alice.snapshot_vm, vm["id"])
        used = -(-snap["size_bytes"] // (1 << 20))
        assert (err.status, err.message) == (403, f"snapshot storage limit reached ({used}/1 MiB)")
        skipped = wait_for(
            lambda: logged(hatch, "idle snapshot skipped", vm["id"]), 60, "the reaper to skip it"
        )
        assert skipped["reason"] == err.message
        assert alice.get_vm(vm["id"])["state"] == "running"
        assert len(alice.list_snapshots(vm["id"])) == 1
    with hatch.client(hatch.create_key("bob")) as bob:
        other = bob.create_vm(**SMALL)
        assert bob.snapshot_vm(other["id"])["vm_id"] == other["id"]  # bob's own storage
