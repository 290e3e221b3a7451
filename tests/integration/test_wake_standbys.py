"""Wake standbys on real guests: once a sleeping VM's snapshot is stored, its QEMU is started
again and waits for its state, its TAP on the bridge but down; the wake through the proxy
loads the state into that very QEMU; a fork of the sleeping VM gives it a copy of its memory
file and a new standby on it (its children map the old file); and a standby whose memory file
was replaced is never resumed: a fork's child would see its parent's writes."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import subprocess
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from hatchvm.client import HatchClient
from hatchvm.net.alloc import tap_name
from tests.integration.test_fork import WHO, who
from tests.support.daemon import HatchDaemon
from tests.support.wait import wait_for, wait_http

pytestmark = pytest.mark.vm


@pytest.fixture(scope="module")
def hatch() -> Iterator[HatchDaemon]:
    daemon = HatchDaemon(HATCH_STOP_TIMEOUT="5")
    try:
        daemon.start()
        yield daemon
    finally:
        daemon.cleanup()


def _qemu(hatch: HatchDaemon, vm_id: str) -> tuple[int, list[str]] | None:
    """The VM's QEMU (pid, command line), if one runs."""
    try:
        pid = int((hatch.data_dir / "vms" / vm_id / "qemu.pid").read_text())
        args = Path(f"/proc/{pid}/cmdline").read_bytes().rstrip(b"\0").split(b"\0")
    except (OSError, ValueError):
        return None
    return pid, [a.decode() for a in args]


def _standby(hatch: HatchDaemon, vm_id: str) -> int | None:
    """The pid of the VM's QEMU while it waits for an incoming state."""
    found = _qemu(hatch, vm_id)
    return found[0] if found is not None and "-incoming" in found[1] else None


def _tap_up(hatch: HatchDaemon, vm_id: str) -> bool:
    tap = tap_name(hatch.tap_prefix, vm_id)
    shown = subprocess.run(["ip", "-j", "link", "show", "dev", tap], capture_output=True)
    (link,) = json.loads(shown.stdout)  # the TAP exists (else this raises)
    return "UP" in link["flags"]


def _standbys_metric(hatch: HatchDaemon) -> float:
    text = httpx.get(f"{hatch.url}/metrics", timeout=10).text
    line = next(li for li in text.splitlines() if li.startswith("hatch_wake_standbys "))
    return float(line.split()[1])


def _asleep(api: HatchClient, hatch: HatchDaemon, vm_id: str) -> int:
    """Snapshot the VM, wait until it is stored and its standby waits; the standby's pid."""
    snap = api.snapshot_vm(vm_id, wait_stored=True)
    assert snap["status"] == "stored"
    return wait_for(lambda: _standby(hatch, vm_id), 30, "the wake standby")


def _asleep_remembering(api: HatchClient, hatch: HatchDaemon, word: str) -> tuple[dict, int]:
    """A new VM whose guest holds word in memory (/tmp, a tmpfs), put to sleep: the VM and
    its standby's pid."""
    vm = api.create_vm(mem_mib=256, user_data=WHO)
    wait_http(f"http://{vm['guest_ip']}:8080/cgi-bin/who")
    api.exec(vm["id"], f"echo {word} > /tmp/in-memory")
    return vm, _asleep(api, hatch, vm["id"])


def test_the_wake_loads_the_state_into_the_standby(hatch: HatchDaemon) -> None:
    api = hatch.client(hatch.create_key("alice"))
    vm = api.create_vm(mem_mib=256, user_data=WHO)
    wait_http(f"http://{vm['guest_ip']}:8080/cgi-bin/who")
    api.exec(vm["id"], "echo slept > /tmp/in-memory")
    route = api.create_route(vm["id"], 8080)
    running = _qemu(hatch, vm["id"])
    assert running is not None and "-incoming" not in running[1]  # the probe tells them apart

    standby = _asleep(api, hatch, vm["id"])
    assert standby != running[0]
    assert api.get_vm(vm["id"])["state"] == "snapshotted"
    assert not _tap_up(hatch, vm["id"])  # on the bridge, but nothing passes it
    assert _standbys_metric(hatch) == 1

    response = httpx.get(
        f"http://127.0.0.1:{hatch.proxy_port}/cgi-bin/who",
        headers={"Host": f"{route['subdomain']}.hatch.local"},
        timeout=60,
    )
    assert response.status_code == 200 and "memory=slept" in response.text
    woken = _qemu(hatch, vm["id"])
    assert woken is not None and woken[0] == standby  # the same QEMU, now running the guest
    assert _tap_up(hatch, vm["id"])
    assert _standbys_metric(hatch) == 0
    api.delete_vm(vm["id"])
    assert _qemu(hatch, vm["id"]) is None


def test_a_forked_sleeping_vm_wakes_from_a_standby_on_its_own_copy(hatch: HatchDaemon) -> None:
    api = hatch.client(hatch.create_key("bob"))
    parent, standby = _asleep_remembering(api, hatch, "before")
    mem = hatch.data_dir / "vms" / parent["id"] / "mem"

    # The child maps its parent's memory file (a link to it) privately: it shares every page
    # it has not written, and would see any write made to that file. The standby maps that
    # file too, so hatchd gives the parent a copy of its own and a new standby on it.
    (child,) = api.fork_vm(parent["id"])
    assert who(child["guest_ip"])["memory"] == "before"
    renewed = wait_for(
        lambda: (pid := _standby(hatch, parent["id"])) != standby and pid, 60, "a new standby"
    )
    assert mem.stat().st_nlink == 1  # its own copy; the child holds the old file alone
    assert api.get_vm(parent["id"])["state"] == "snapshotted"

    api.exec(parent["id"], "echo after > /tmp/in-memory; sync")
    woken = _qemu(hatch, parent["id"])
    assert woken is not None and woken[0] == renewed  # the wake took the new standby
    assert api.exec(parent["id"], ["cat", "/tmp/in-memory"])["stdout"] == "after\n"
    assert who(child["guest_ip"])["memory"] == "before"
    assert api.exec(child["id"], ["cat", "/tmp/in-memory"])["stdout"] == "before\n"
    for vm in (child, parent):
        api.delete_vm(vm["id"])


def test_a_standby_is_not_resumed_on_a_memory_file_replaced_since(
    hatch: HatchDaemon, tmp_path: Path
) -> None:
    """The driver's own guard, for a wake that comes before the parent's copy is made (a
    fork's children link the old file, frozen.unshare gave the VM a copy): here the test
    replaces the file itself, keeping a link to the old one as a child would."""
    api = hatch.client(hatch.create_key("dave"))
    vm, standby = _asleep_remembering(api, hatch, "before")
    mem = hatch.data_dir / "vms" / vm["id"] / "mem"
    old = tmp_path / "old-mem"
    os.link(mem, old)
    shutil.copyfile(mem, mem.with_name("mem.copy"))
    os.replace(mem.with_name("mem.copy"), mem)
    before = hashlib.sha256(old.read_bytes()).hexdigest()

    api.exec(vm["id"], "echo after > /tmp/in-memory; sync")
    woken = _qemu(hatch, vm["id"])
    assert woken is not None and woken[0] != standby  # started afresh, on the file's copy
    assert "does not fit the restore" in hatch.log_path.read_text(errors="replace")
    assert api.exec(vm["id"], ["cat", "/tmp/in-memory"])["stdout"] == "after\n"
    assert hashlib.sha256(old.read_bytes()).hexdigest() == before  # nothing wrote the old one
    api.delete_vm(vm["id"])


def test_a_stopped_daemon_leaves_no_standby_and_a_started_one_offers_it_again() -> None:
    """SIGTERM (a service stop) ends hatchd in order: its standbys end with it; the next
    hatchd starts them again for the VMs that still sleep on their stored snapshots."""
    hatch = HatchDaemon(HATCH_STOP_TIMEOUT="5")
    try:
        hatch.start()
        key = hatch.create_key("carol")
        api = hatch.client(key)
        vm = api.create_vm(mem_mib=256, user_data=WHO)
        wait_http(f"http://{vm['guest_ip']}:8080/cgi-bin/who")
        api.exec(vm["id"], "echo slept > /tmp/in-memory")
        first = _asleep(api, hatch, vm["id"])

        hatch.stop()
        assert hatch.proc is not None and hatch.proc.returncode == 0  # not killed by it
        assert _qemu(hatch, vm["id"]) is None
        assert "hatchd shutting down" in hatch.log_path.read_text(errors="replace")

        hatch.start()
        api = hatch.client(key)
        again = wait_for(lambda: _standby(hatch, vm["id"]), 30, "the standby offered again")
        assert again != first
        assert api.get_vm(vm["id"])["state"] == "snapshotted"
        woken = api.restore_vm(vm["id"])
        assert woken["state"] == "running"
        assert api.exec(vm["id"], ["cat", "/tmp/in-memory"])["stdout"] == "slept\n"
        running = _qemu(hatch, vm["id"])
        assert running is not None and running[0] == again
    finally:
        hatch.cleanup()
