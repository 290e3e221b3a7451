"""hatchd with HATCH_VMM=firecracker, its "Firecracker" being the API double
(tests/support/firecracker_double.py): the daemon's wiring of the Firecracker driver, through
the REST API, where no real Firecracker can run. An explicit HATCH_VMM=firecracker starts
although KVM is unusable here (with a warning); create, console, snapshot, restore, a daemon
killed and restarted (the VM reattached), stop, start, a death behind hatchd's back and
delete all go through the double's API contract; a networked VM's NIC is put on the TAP
hatchd made, and a request to its route or a connection to its SSH port wakes it from its
snapshot. No guest runs, so nothing answers those: what a woken guest serves over Firecracker
is the real-Firecracker suite's (HATCH_TEST_VMM=firecracker on a KVM host)."""

from __future__ import annotations

import os
import signal
import socket
from pathlib import Path

import httpx
import pytest

from hatchvm.ids import DEFAULT_IMAGE_ID
from hatchvm.images.builder import CURRENT
from tests.support.firecracker_double import SWAGGER, launcher
from tests.support.wait import wait_for
from tests.unit.core_on_fake import _fake_image


@pytest.fixture
def hatch(daemon_factory, tmp_path: Path):
    if not SWAGGER.exists():
        pytest.fail(f"Firecracker's swagger file is missing: {SWAGGER}")
    d = daemon_factory(
        with_image=False,
        HATCH_VMM="firecracker",
        HATCH_FIRECRACKER_BIN=str(launcher(tmp_path)),
        HATCH_STOP_TIMEOUT="5",
        HATCH_PROXY_WAKE_TIMEOUT="2",  # nothing will answer after the wake
    )
    image_dir = d.data_dir / "images" / DEFAULT_IMAGE_ID
    _fake_image(image_dir)  # placeholders: the double opens but never reads them
    (version,) = [p.name for p in image_dir.iterdir() if p.is_dir()]
    (image_dir / CURRENT).write_text(version)
    d.start()
    return d


def _fc_pid(hatch, vm_id: str) -> int:
    return int((hatch.data_dir / "vms" / vm_id / "firecracker.pid").read_text())


def test_the_vm_lifecycle_through_hatchd_on_the_firecracker_double(hatch) -> None:
    with hatch.client(hatch.create_key("alice")) as api:
        health = api.health()
        assert health["vmm"] == "firecracker"
        assert health["accel"] == "none"
        assert "firecracker chosen but KVM is unusable" in hatch.log_tail(200)

        vm = api.create_vm(enable_network=False, mem_mib=128)
        assert vm["state"] == "running"
        wait_for(lambda: "firecracker double" in api.console(vm["id"]), 10, "the console")

        snap = api.snapshot_vm(vm["id"])
        assert api.get_vm(vm["id"])["state"] == "snapshotted"
        mem = hatch.data_dir / "vms" / vm["id"] / "mem"
        assert mem.stat().st_size == 128 << 20  # a full snapshot wrote all of guest RAM
        assert api.restore_vm(vm["id"], snap["id"])["state"] == "running"
        wait_for(lambda: "snapshot loaded" in api.console(vm["id"]), 10, "the restored console")

        pid = _fc_pid(hatch, vm["id"])
        hatch.kill()  # SIGKILL: Firecracker runs on in its own session
        os.kill(pid, 0)
        hatch.start()
        assert api.get_vm(vm["id"])["state"] == "running"
        assert _fc_pid(hatch, vm["id"]) == pid
        assert "vm reattached" in hatch.log_tail(200)

        assert api.stop_vm(vm["id"])["state"] == "stopped"  # ctrl-alt-del: the guest resets
        assert not (hatch.data_dir / "vms" / vm["id"] / "firecracker.pid").exists()
        assert api.start_vm(vm["id"])["state"] == "running"

        os.kill(_fc_pid(hatch, vm["id"]), signal.SIGKILL)  # a death behind hatchd's back
        dead = wait_for(
            lambda: (v := api.get_vm(vm["id"]))["state"] == "stopped" and v, 10, "the death"
        )
        assert "SIGKILL" in dead["state_reason"]

        api.delete_vm(vm["id"])
        assert not (hatch.data_dir / "vms" / vm["id"]).exists()


def test_a_route_and_the_ssh_gateway_wake_a_networked_vm_on_the_double(hatch) -> None:
    with hatch.client(hatch.create_key("alice")) as api:
        vm = api.create_vm(mem_mib=128)  # networked: its NIC on the TAP hatchd made
        assert vm["state"] == "running" and vm["guest_ip"]
        log = hatch.data_dir / "vms" / vm["id"] / "firecracker.log"
        wait_for(
            lambda: log.exists() and "PUT /network-interfaces/eth0: ok" in log.read_text(),
            10,
            "the NIC configured",
        )
        api.create_route(vm["id"], target_port=8080, subdomain="fcwake")

        api.snapshot_vm(vm["id"])
        httpx.get(
            f"http://127.0.0.1:{hatch.proxy_port}/",
            headers={"Host": f"fcwake.hatch.local:{hatch.proxy_port}"},
            timeout=30,
        )  # nothing serves it: an error, after the wake
        assert api.get_vm(vm["id"])["state"] == "running"
        assert "waking vm from its latest snapshot" in hatch.log_tail(200)

        api.snapshot_vm(vm["id"])
        with socket.create_connection(("127.0.0.1", vm["ssh_port"]), timeout=30) as ssh:
            ssh.sendall(b"SSH-2.0-OpenSSH_9.2 test\r\n")  # the gateway wakes after this line
            wait_for(lambda: api.get_vm(vm["id"])["state"] == "running", 20, "the ssh wake")
        api.delete_vm(vm["id"])
