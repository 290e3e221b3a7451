"""Kill -9 anywhere: hatchd is SIGKILLed at each step boundary of create, stop, start,
snapshot (capture, store), restore, wake, delete and fork (its crash points, HATCH_CRASH_AT), then
restarted. Afterwards no VM is lost or stuck in a transitional state, nothing is leaked (QEMU
process, TAP, nft element, neighbour pin, work files) and every VM is still usable as its state
allows."""

from __future__ import annotations

import subprocess
import threading
from collections.abc import Callable
from functools import partial

import httpx
import pytest

from hatchvm.client import HatchClient
from hatchvm.net.alloc import tap_name
from tests.support.daemon import HatchDaemon
from tests.support.host import asleep, link_exists, pinned_addresses, qemu_pids
from tests.support.wait import wait_for, wait_http

pytestmark = pytest.mark.vm

WEB = """#!/bin/sh
mkdir -p /srv/www
cat /proc/sys/kernel/random/boot_id > /srv/www/boot_id
busybox httpd -p 8080 -h /srv/www
"""
SMALL = {"mem_mib": 128, "user_data": WEB}
SETTLED = {"running", "stopped", "snapshotted"}
LEFTOVERS = ("snapshot-work", "restore-previous", "resume/pending", "storing", "mem.unshared")


def proxied(hatch: HatchDaemon) -> httpx.Response:
    return httpx.get(
        f"http://127.0.0.1:{hatch.proxy_port}/boot_id",
        headers={"Host": "crash.hatch.local"},
        timeout=120,
    )


def older_snapshot(api: HatchClient, vm: dict) -> str:
    return str(api.list_snapshots(vm["id"])[-1]["id"])


# point, the state the VM is brought to first, the call that reaches the point
CASES: list[tuple[str, str | None, Callable[[HatchClient, HatchDaemon, dict], object]]] = [
    ("create.inserted", None, lambda api, h, vm: api.create_vm(**SMALL)),
    ("create.prepared", None, lambda api, h, vm: api.create_vm(**SMALL)),
    ("boot.vmm-started", None, lambda api, h, vm: api.create_vm(**SMALL)),
    ("boot.resumed", None, lambda api, h, vm: api.create_vm(**SMALL)),
    ("stop.begun", "running", lambda api, h, vm: api.stop_vm(vm["id"])),
    ("stop.vmm-ended", "running", lambda api, h, vm: api.stop_vm(vm["id"])),
    ("start.begun", "stopped", lambda api, h, vm: api.start_vm(vm["id"])),
    ("boot.resumed", "stopped", lambda api, h, vm: api.start_vm(vm["id"])),
    ("snapshot.begun", "running", lambda api, h, vm: api.snapshot_vm(vm["id"])),
    ("snapshot.captured", "running", lambda api, h, vm: api.snapshot_vm(vm["id"])),
    ("snapshot.recorded", "running", lambda api, h, vm: api.snapshot_vm(vm["id"])),
    # In the background store, after the call returned: its files are intact, it resumes.
    ("snapshot.packed", "running", lambda api, h, vm: api.snapshot_vm(vm["id"])),
    ("snapshot.stored", "running", lambda api, h, vm: api.snapshot_vm(vm["id"])),
    ("snapshot.settled", "running", lambda api, h, vm: api.snapshot_vm(vm["id"])),
    # A wake while the snapshot is being stored (it resumes on a copy of the files).
    ("restore.vmm-started", "storing", lambda api, h, vm: proxied(h)),
    ("restore.begun", "snapshotted", lambda api, h, vm: api.restore_vm(vm["id"])),
    ("restore.vmm-started", "snapshotted", lambda api, h, vm: api.restore_vm(vm["id"])),
    ("restore.running", "snapshotted", lambda api, h, vm: api.restore_vm(vm["id"])),
    (
        "restore.laid-out",  # from the store: the VM's files put aside, the new ones empty
        "twice-snapshotted",
        lambda api, h, vm: api.restore_vm(vm["id"], older_snapshot(api, vm)),
    ),
    (
        "restore.files-ready",  # ... filled, and the VMM started ahead, waiting for its state
        "twice-snapshotted",
        lambda api, h, vm: api.restore_vm(vm["id"], older_snapshot(api, vm)),
    ),
    ("restore.vmm-started", "snapshotted", lambda api, h, vm: proxied(h)),  # a wake
    ("boot.vmm-started", "stopped", lambda api, h, vm: proxied(h)),  # a cold-boot wake
    ("delete.torn-down", "running", lambda api, h, vm: api.delete_vm(vm["id"])),
    ("fork.paused", "running", lambda api, h, vm: api.fork_vm(vm["id"], 2)),
    ("fork.reserved", "running", lambda api, h, vm: api.fork_vm(vm["id"], 2)),
    ("fork.child-resumed", "snapshotted", lambda api, h, vm: api.fork_vm(vm["id"], 2)),
    ("fork.child-remade", "running", lambda api, h, vm: api.fork_vm(vm["id"], 2)),
]


def bring_to(api: HatchClient, hatch: HatchDaemon, state: str | None) -> dict | None:
    if state is None:
        return None
    vm = api.create_vm(**SMALL)
    wait_http(f"http://{vm['guest_ip']}:8080/boot_id")
    api.create_route(vm["id"], target_port=8080, subdomain="crash")
    if state == "stopped":
        api.stop_vm(vm["id"])
    elif state == "snapshotted":
        api.snapshot_vm(vm["id"], wait_stored=True)
    elif state == "storing":  # snapshotted, and its store held until hatchd dies
        (hatch.data_dir / "hold").touch()
        api.snapshot_vm(vm["id"])
    elif state == "twice-snapshotted":
        api.snapshot_vm(vm["id"], wait_stored=True)
        api.restore_vm(vm["id"])
        api.snapshot_vm(vm["id"], wait_stored=True)
    return vm


def in_guests_set(hatch: HatchDaemon, tap: str) -> bool:
    out = subprocess.run(
        ["nft", "list", "set", "bridge", hatch.table, "guests"], capture_output=True, text=True
    ).stdout
    return f'"{tap}"' in out


def as_its_state_says(hatch: HatchDaemon, vm: dict, tap: str) -> bool:
    """A running VM has its QEMU, TAP, rules and neighbour entry; one that does not run has
    none of them, except that a sleeping VM may have its wake standby: one QEMU waiting for
    its state, its TAP attached but down (started once its snapshot is stored, so perhaps
    only now: the caller waits for this to hold)."""
    running = vm["state"] == "running"
    pids = qemu_pids(vm["id"])
    standby = vm["state"] == "snapshotted" and bool(pids)
    if (standby and not asleep(vm["id"], tap)) or (not standby and bool(pids) != running):
        return False
    if not vm["guest_ip"]:
        return True
    attached = running or standby
    return (
        link_exists(tap) == attached
        and in_guests_set(hatch, tap) == attached
        and (vm["guest_ip"] in pinned_addresses(hatch.bridge)) == attached
    )


def check_settled_and_usable(api: HatchClient, hatch: HatchDaemon, point: str) -> None:
    vms = api.list_vms()
    for vm in vms:  # a store cut short resumes from the captured files, which are intact
        for snap in api.list_snapshots(vm["id"]):
            assert api.wait_stored(snap["id"])["status"] == "stored", snap
    vms = api.list_vms()
    for vm in vms:
        state = vm["state"]
        # A create or delete cut short leaves a VM in error (with no disk), and so does a fork
        # cut short for each child it was making (it may hold its parent's identity and RNG
        # state); such a VM can only be deleted. Every other VM is settled.
        if state == "error":
            if point.startswith("fork."):  # a child with its files, or one not yet given them
                assert "fork was interrupted" in vm["state_reason"] or (
                    "has no disk" in vm["state_reason"]
                ), vm
            else:
                assert point.startswith(("create.", "delete.")), vm
                assert "has no disk" in vm["state_reason"], vm
        else:
            assert state in SETTLED, vm
        tap = tap_name(hatch.tap_prefix, vm["id"])
        wait_for(partial(as_its_state_says, hatch, vm, tap), 30, f"{vm} and its host side")
        vm_dir = hatch.data_dir / "vms" / vm["id"]
        for leftover in LEFTOVERS:
            assert not (vm_dir / leftover).exists(), (vm["id"], leftover)
        # Usable as its state allows, then deleted without a trace.
        if state == "snapshotted":
            assert api.restore_vm(vm["id"])["state"] == "running"
        elif state == "stopped":
            assert api.start_vm(vm["id"])["state"] == "running"
        if state != "error":
            wait_http(f"http://{vm['guest_ip']}:8080/boot_id")
            api.snapshot_vm(vm["id"])
            api.restore_vm(vm["id"])
        api.delete_vm(vm["id"])
        assert qemu_pids(vm["id"]) == [] and not vm_dir.exists()
        if vm["guest_ip"]:
            assert not link_exists(tap) and not in_guests_set(hatch, tap)
    assert api.list_vms() == []


@pytest.mark.parametrize(
    ("point", "state", "call"), CASES, ids=[f"{p}-{s or 'new'}" for p, s, _ in CASES]
)
def test_hatchd_killed_at(daemon_factory, point, state, call) -> None:
    hatch = daemon_factory(
        HATCH_VM_DISK_MIB="64", HATCH_STOP_TIMEOUT="10", HATCH_HOLD_AT="snapshot.storing"
    )
    hatch.env["HATCH_HOLD_FILE"] = str(hatch.data_dir / "hold")
    hatch.start()
    key = hatch.create_key("alice")
    with hatch.client(key) as api:
        vm = bring_to(api, hatch, state)
    hatch.stop()
    hatch.env["HATCH_CRASH_AT"] = point
    hatch.start()
    with hatch.client(key) as api:
        worker = threading.Thread(target=lambda: _swallow(lambda: call(api, hatch, vm)))
        worker.start()
        assert hatch.proc is not None
        hatch.proc.wait(180)  # it dies at the crash point (never hangs: a deadline)
        worker.join(180)
    assert f'"point": "{point}"' in hatch.log_tail(20)  # it died where it was meant to
    del hatch.env["HATCH_CRASH_AT"]
    (hatch.data_dir / "hold").unlink(missing_ok=True)
    hatch.start()
    with hatch.client(key) as api:
        wait_for(lambda: api.list_vms() is not None, 30, "the API")
        check_settled_and_usable(api, hatch, point)
    forks = hatch.data_dir / "forks"  # a fork's frozen moments
    assert not forks.exists() or not any(forks.iterdir())


def _swallow(call: Callable[[], object]) -> None:
    try:
        call()
    except Exception:
        pass  # the daemon dies under the call
