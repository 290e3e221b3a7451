"""hatchd with HATCH_VMM=firecracker, its "Firecracker" being the API double
(tests/support/firecracker_double.py): the daemon's wiring of the Firecracker driver, through
the REST API, where no real Firecracker can run. An explicit HATCH_VMM=firecracker starts
although KVM is unusable here (with a warning); create, console, snapshot, restore, a daemon
killed and restarted (the VM reattached), stop, start, a death behind hatchd's back and
delete all go through the double's API contract; a networked VM's NIC is put on the TAP
hatchd made, and a request to its route or a connection to its SSH port wakes it from its
snapshot. No guest runs, so nothing answers those: what a woken guest serves over Firecracker
is the real-Firecracker suite's (HATCH_TEST_VMM=firecracker on a KVM host). The same with the
jailer (HATCH_FIRECRACKER_JAILER, its double: tests/support/jailer_double.py): each VM's double
runs chrooted in its jail as its own uid."""

from __future__ import annotations

import os
import signal
import socket
from pathlib import Path

import httpx
import pytest

from hatchvm.ids import DEFAULT_IMAGE_ID
from hatchvm.images.builder import CURRENT
from hatchvm.vmm import acl
from tests.support import jailer_double
from tests.support.cgroups import cgroup_of, host_cgroups, limits_of
from tests.support.firecracker_double import SWAGGER, launcher
from tests.support.wait import wait_for
from tests.unit.core_on_fake import _fake_image

JAIL_UID_BASE = 910_300


@pytest.fixture
def hatch(daemon_factory, tmp_path: Path):
    return _hatch(daemon_factory, tmp_path, HATCH_FIRECRACKER_JAILER="")


@pytest.fixture
def jailed_hatch(daemon_factory, tmp_path: Path):
    if os.geteuid() != 0:
        pytest.skip("the jailer needs root")
    return _hatch(
        daemon_factory,
        tmp_path,
        HATCH_FIRECRACKER_JAILER=str(jailer_double.launcher(tmp_path)),
        HATCH_FIRECRACKER_UID_BASE=str(JAIL_UID_BASE),
        HATCH_FIRECRACKER_UID_COUNT="16",
    )


def _hatch(daemon_factory, tmp_path: Path, **env: str):
    if not SWAGGER.exists():
        pytest.fail(f"Firecracker's swagger file is missing: {SWAGGER}")
    d = daemon_factory(
        with_image=False,
        HATCH_VMM="firecracker",
        HATCH_FIRECRACKER_BIN=str(launcher(tmp_path)),
        HATCH_STOP_TIMEOUT="5",
        HATCH_PROXY_WAKE_TIMEOUT="2",  # nothing will answer after the wake
        **env,
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
        # The proxy gives up after HATCH_PROXY_WAKE_TIMEOUT (2 s); the wake it started goes on,
        # and on a loaded machine the double's restore can take longer than that.
        wait_for(lambda: api.get_vm(vm["id"])["state"] == "running", 30, "the route's wake")
        assert "waking vm from its latest snapshot" in hatch.log_tail(200)

        api.snapshot_vm(vm["id"])
        with socket.create_connection(("127.0.0.1", vm["ssh_port"]), timeout=30) as ssh:
            ssh.sendall(b"SSH-2.0-OpenSSH_9.2 test\r\n")  # the gateway wakes after this line
            wait_for(lambda: api.get_vm(vm["id"])["state"] == "running", 20, "the ssh wake")
        api.delete_vm(vm["id"])


def _jail(hatch, vm_id: str) -> Path:
    return hatch.data_dir / "jailer" / "firecracker" / vm_id.replace("_", "-")


def _uid(pid: int) -> int:
    status = Path(f"/proc/{pid}/status").read_text()
    return int(next(line for line in status.splitlines() if line.startswith("Uid:")).split()[1])


def test_the_vm_lifecycle_through_hatchd_with_the_jailer_on_the_doubles(jailed_hatch) -> None:
    hatch = jailed_hatch
    with hatch.client(hatch.create_key("alice")) as api:
        vm = api.create_vm(mem_mib=128)  # networked: the jailed double opens its TAP
        assert vm["state"] == "running"
        assert "firecracker runs jailed" in hatch.log_tail(200)
        vm_dir = hatch.data_dir / "vms" / vm["id"]
        pid = _fc_pid(hatch, vm["id"])
        uid = _uid(pid)
        assert JAIL_UID_BASE <= uid < JAIL_UID_BASE + 16
        if (cgroups := host_cgroups(hatch.cgroup_parent)) is not None:
            # The jailer made its cgroup, named after the jail, with the VM's limits.
            name = vm["id"].replace("_", "-")
            assert cgroup_of(pid, cgroups)[0] == f"/{hatch.cgroup_parent}/{name}"
            memory, quota, period = limits_of(cgroups, name)
            assert memory > 128 << 20 and (quota, period) == (100_000, 100_000)
        assert (_jail(hatch, vm["id"]) / "root" / "drives" / "disk").stat().st_ino == (
            vm_dir / "disk.ext4"
        ).stat().st_ino
        wait_for(lambda: "firecracker double" in api.console(vm["id"]), 10, "the console")
        log = vm_dir / "firecracker.log"
        wait_for(
            lambda: log.exists() and "PUT /network-interfaces/eth0: ok" in log.read_text(),
            10,
            "the NIC configured",
        )

        snap = api.snapshot_vm(vm["id"])
        assert not _jail(hatch, vm["id"]).exists()
        mem = vm_dir / "mem"
        assert mem.stat().st_size == 128 << 20 and mem.stat().st_uid == 0
        assert mem.stat().st_mode & 0o777 == 0o600 and acl.users(mem) == {}
        assert api.restore_vm(vm["id"], snap["id"])["state"] == "running"
        wait_for(lambda: "snapshot loaded" in api.console(vm["id"]), 10, "the restored console")

        pid = _fc_pid(hatch, vm["id"])
        hatch.kill()  # SIGKILL: the jailed Firecracker runs on
        os.kill(pid, 0)
        hatch.start()
        assert api.get_vm(vm["id"])["state"] == "running"
        assert _fc_pid(hatch, vm["id"]) == pid
        assert "vm reattached" in hatch.log_tail(200)

        assert api.stop_vm(vm["id"])["state"] == "stopped"
        assert not _jail(hatch, vm["id"]).exists()
        assert api.start_vm(vm["id"])["state"] == "running"
        os.kill(_fc_pid(hatch, vm["id"]), signal.SIGKILL)  # a death behind hatchd's back
        wait_for(lambda: api.get_vm(vm["id"])["state"] == "stopped", 10, "the death")
        assert not _jail(hatch, vm["id"]).exists()
        assert api.start_vm(vm["id"])["state"] == "running"
        api.delete_vm(vm["id"])
        assert not _jail(hatch, vm["id"]).exists()
        image = hatch.data_dir / "images" / DEFAULT_IMAGE_ID
        for path in image.rglob("*"):
            if path.is_file() and not path.is_symlink():
                assert acl.users(path) == {}, path
