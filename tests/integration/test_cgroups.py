"""Each VM's QEMU in its own cgroup, against the host's real controllers: every thread inside,
the VM's limits on it, gone with the process, and found again by a restarted daemon."""

from __future__ import annotations

import contextlib
import os
import socket
import threading
import time

import httpx
import pytest

from hatchvm.vmm.cgroups import Limits, VMCgroups
from hatchvm.vmm.overhead import memory_limit_mib
from tests.integration.test_routes_proxy import WEB_SERVER
from tests.support.cgroups import (
    cgroup_of,
    host_cgroups,
    limits_of,
    memory_of,
    set_cpu_quota,
    threads_of,
)
from tests.support.host import qemu_pids
from tests.support.wait import wait_for, wait_http

pytestmark = pytest.mark.vm


@pytest.fixture
def hatch(daemon_factory):
    if host_cgroups("hatchvm") is None:
        pytest.skip("no memory and cpu cgroup controllers on this host")
    d = daemon_factory(HATCH_CGROUPS="required")
    d.start()
    return d


@pytest.fixture
def cgroups(hatch) -> VMCgroups:
    found = host_cgroups(hatch.cgroup_parent)
    assert found is not None
    return found


def assert_confined(cgroups: VMCgroups, vm_id: str) -> None:
    """The VM's QEMU, every one of its threads, and nothing else, is in the VM's group."""
    pids = qemu_pids(vm_id)
    assert pids, f"no qemu for {vm_id}"
    group = f"/{cgroups.parent}/{vm_id}"
    for pid in pids:
        for tid in threads_of(pid):
            paths = cgroup_of(pid, cgroups, tid)
            assert paths and all(p == group for p in paths), (pid, tid, paths)
    assert cgroups.pids(vm_id) == set(pids)


def expected_limits(hatch, vm: dict) -> tuple[int, int, int]:
    accel = httpx.get(hatch.url + "/healthz").json()["accel"]
    tb_size = hatch.settings().qemu_tb_size_mib if accel == "tcg" else 0
    memory = memory_limit_mib(vm["mem_mib"], tb_size) << 20
    return memory, vm["vcpu_count"] * 100_000, 100_000


def test_each_vm_runs_in_its_own_cgroup_with_its_limits(hatch, api, cgroups) -> None:
    a = api.create_vm(user_data=WEB_SERVER, mem_mib=256)
    b = api.create_vm(enable_network=False, vcpu_count=2, mem_mib=384)
    assert cgroups.groups() == {a["id"], b["id"]}
    for vm in (a, b):
        assert_confined(cgroups, vm["id"])
        assert limits_of(cgroups, vm["id"]) == expected_limits(hatch, vm)

    # The group follows the process: gone with a snapshot, back with the restore.
    api.snapshot_vm(a["id"])
    assert cgroups.groups() == {b["id"]}
    api.restore_vm(a["id"])
    assert_confined(cgroups, a["id"])
    assert limits_of(cgroups, a["id"]) == expected_limits(hatch, a)
    wait_http(f"http://{a['guest_ip']}:8080/")

    api.stop_vm(a["id"])
    assert cgroups.groups() == {b["id"]}
    api.delete_vm(b["id"])
    assert cgroups.groups() == set()


FILL_MIB = 160
FILL = """#!/bin/sh
echo "fill waiting" > /dev/console
busybox nc -l -p 7000 > /dev/null  # the host connects once it has measured the guest at rest
mkdir -p /mnt/fill && mount -t tmpfs -o size={mib}m tmpfs /mnt/fill
dd if=/dev/zero of=/mnt/fill/x bs=1M count={mib}
echo "fill done" > /dev/console
mkdir -p /srv/www && echo alive > /srv/www/index.html && busybox httpd -p 8080 -h /srv/www
"""


def test_a_guest_filling_its_memory_stays_under_its_limit(hatch, api, cgroups) -> None:
    vm = api.create_vm(user_data=FILL.format(mib=FILL_MIB), mem_mib=256)
    console = hatch.data_dir / "vms" / vm["id"] / "console.log"
    wait_for(lambda: "fill waiting" in console.read_text(), 120, "the guest to boot")
    limit = limits_of(cgroups, vm["id"])[0]
    before, _peak, _ooms = memory_of(cgroups, vm["id"])
    wait_for(lambda: _knock(vm["guest_ip"], 7000), 60, "the guest's trigger port")
    wait_for(lambda: "fill done" in console.read_text(), 120, "the guest to fill its memory")
    after, peak, ooms = memory_of(cgroups, vm["id"])
    # The probe sees the guest's memory (positive control): the fill is charged here (less
    # the pages the guest had touched before, at boot)...
    assert after - before >= (FILL_MIB // 2) << 20, (before, after)
    # ...and with it QEMU stays under the VM's limit, without the OOM killer.
    assert peak <= limit and ooms == 0, (peak, limit, ooms)
    assert wait_http(f"http://{vm['guest_ip']}:8080/").strip() == "alive"
    assert_confined(cgroups, vm["id"])


def _knock(ip: str, port: int) -> bool:
    try:
        socket.create_connection((ip, port), timeout=2).close()
    except OSError:
        return False
    return True


def move_out(cgroups: VMCgroups, pid: int) -> None:
    """Put a process back in each hierarchy's root, as if started by a hatchd without cgroups."""
    for root in cgroups.layout.roots:
        (root / "cgroup.procs").write_text(str(pid))


def test_only_qemu_writes_and_reads_a_snapshots_state(hatch, api, cgroups) -> None:
    """The VM's group is removed, whatever is left in it killed, as soon as its QEMU has been
    captured: the device state must be whole by then, so nothing but QEMU may write it (a
    helper in the group, such as QEMU's exec:cat, could still be behind and lose its end).
    With the group short of CPU time the capture spans many periods: any helper is seen."""
    vm = api.create_vm(user_data=WEB_SERVER, mem_mib=256)
    boot = wait_http(f"http://{vm['guest_ip']}:8080/boot_id")
    seen: set[int] = set()
    done = threading.Event()

    def watch() -> None:
        while not done.is_set():
            with contextlib.suppress(OSError):  # ENODEV: the group is being removed
                seen.update(cgroups.pids(vm["id"]))
            time.sleep(0.001)

    (captured,) = qemu_pids(vm["id"])
    set_cpu_quota(cgroups, vm["id"], 2_000)  # 2% of a CPU
    watcher = threading.Thread(target=watch)
    watcher.start()
    try:
        api.snapshot_vm(vm["id"], wait_stored=True)
        assert api.restore_vm(vm["id"])["state"] == "running"
        (restored,) = qemu_pids(vm["id"])
    finally:
        done.set()
        watcher.join()
    assert seen - {captured, restored} == set()
    assert wait_http(f"http://{vm['guest_ip']}:8080/boot_id") == boot  # resumed
    assert hatch.events("restore failed", vm["id"]) == []


def test_cgroups_follow_vms_across_a_daemon_kill(hatch, cgroups) -> None:
    key = hatch.create_key("alice")
    with hatch.client(key) as api:
        kept, moved, lost = (api.create_vm(enable_network=False, mem_mib=256) for _ in range(3))
    hatch.kill()
    for pid in qemu_pids(lost["id"]):  # dies while nobody watches: its group stays behind
        os.kill(pid, 9)
    wait_for(lambda: not cgroups.pids(lost["id"]), 10, "the killed QEMU to leave its group")
    [pid] = qemu_pids(moved["id"])
    move_out(cgroups, pid)
    cgroups.remove(moved["id"])
    cgroups.create("vm_leftover", Limits(memory_bytes=64 << 20, vcpus=1))  # some older debris
    assert cgroups.groups() == {kept["id"], lost["id"], "vm_leftover"}
    assert_confined(cgroups, kept["id"])

    hatch.start()
    # Found again (kept), taken back (moved), and the dead VMs' groups swept away.
    assert cgroups.groups() == {kept["id"], moved["id"]}
    for vm in (kept, moved):
        assert_confined(cgroups, vm["id"])
        assert limits_of(cgroups, vm["id"]) == expected_limits(hatch, vm)
    assert "running vm moved into its cgroup" in hatch.log_path.read_text()
    with hatch.client(key) as api:
        assert api.get_vm(lost["id"])["state"] == "stopped"
        for vm in (kept, moved):
            api.stop_vm(vm["id"])
    assert cgroups.groups() == set()
