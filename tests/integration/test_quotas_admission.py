"""Per-user totals (403 naming the limit) and host admission (503 saying what the host lacks),
against a real hatchd and real guests."""

from __future__ import annotations

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
    """hatchd's first log record of event about vm_id."""
    return next(iter(hatch.events(event, vm_id)), None)


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
        snap = alice.wait_stored(snap["id"])  # its size is known once stored
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
        assert (
            bob.snapshot_vm(other["id"], wait_stored=True)["vm_id"] == other["id"]
        )  # bob's own storage


def restart(hatch, **env: str | None) -> None:
    hatch.stop()  # SIGTERM: the VMs keep running, as in production
    for name, value in env.items():
        if value is None:
            hatch.env.pop(name, None)
        else:
            hatch.env[name] = value
    hatch.start()


def test_host_admission_refuses_what_the_host_cannot_hold(daemon_factory) -> None:
    hatch = daemon_factory()
    hatch.start()
    key = hatch.create_key("alice")
    with hatch.client(key) as api:
        asleep = api.create_vm(user_data=WEB_SERVER, mem_mib=256)
        stopped = api.create_vm(**SMALL)
        wait_http(f"http://{asleep['guest_ip']}:8080/")
        api.create_route(asleep["id"], target_port=8080, subdomain="sleepy")
        api.snapshot_vm(asleep["id"], wait_stored=True)
        api.stop_vm(stopped["id"])

    # A host that must keep more memory than it has holds no VM: nothing boots.
    restart(hatch, HATCH_HOST_MEM_RESERVE_MIB=str(10**9))
    with hatch.client(key) as api:
        for err in (
            refused(api.create_vm, **SMALL),
            refused(api.start_vm, stopped["id"]),
            refused(api.restore_vm, asleep["id"]),
        ):
            assert err.status == 503
            assert err.message.startswith("not enough host memory: ")
            assert err.message.endswith(f"({10**9} MiB kept for the host)")
        woken = via_proxy(hatch, "sleepy")
        assert woken.status_code == 503 and "not enough host memory" in woken.text
        assert [v["state"] for v in api.list_vms()] == ["stopped", "snapshotted"]

    restart(hatch, HATCH_HOST_MEM_RESERVE_MIB=None, HATCH_HOST_DISK_RESERVE_MIB=str(10**9))
    with hatch.client(key) as api:
        for err in (refused(api.create_vm, **SMALL), refused(api.start_vm, stopped["id"])):
            assert err.status == 503
            assert err.message.startswith(f"not enough disk space in {hatch.data_dir}: ")
        assert len(api.list_vms()) == 2

    # On the default reserves the same operations fit.
    restart(hatch, HATCH_HOST_DISK_RESERVE_MIB=None)
    with hatch.client(key) as api:
        assert api.start_vm(stopped["id"])["state"] == "running"
        assert via_proxy(hatch, "sleepy").status_code == 200
        assert api.get_vm(asleep["id"])["state"] == "running"
        assert api.create_vm(**SMALL)["state"] == "running"
