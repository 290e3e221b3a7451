"""The Firecracker double holds requests to Firecracker's contract (so the driver passing on
it means something), and the driver's bodies are what Firecracker's swagger file describes."""

from __future__ import annotations

import asyncio
import os
import shutil
import tempfile
from collections.abc import AsyncIterator
from pathlib import Path

import httpx
import pytest

from hatchvm.vmm import fc_models
from hatchvm.vmm.base import BootSpec, VMMRequestFailed
from hatchvm.vmm.firecracker import FirecrackerVMM
from tests.contract.conftest import _dummy_files
from tests.support.firecracker_double import SWAGGER, launcher, load_routes

pytestmark = pytest.mark.skipif(not SWAGGER.exists(), reason=f"no swagger file at {SWAGGER}")


class Double:
    def __init__(self, root: Path, process: asyncio.subprocess.Process, sock: Path) -> None:
        self.root = root
        self.process = process
        self.client = httpx.AsyncClient(
            transport=httpx.AsyncHTTPTransport(uds=str(sock)), base_url="http://localhost"
        )

    async def call(self, method: str, path: str, body: object = None) -> httpx.Response:
        return await self.client.request(method, path, json=body)

    async def fault(self, method: str, path: str, body: object = None) -> str:
        response = await self.call(method, path, body)
        assert response.status_code == 400, response.text
        return str(response.json()["fault_message"])

    async def ok(self, method: str, path: str, body: object = None) -> None:
        response = await self.call(method, path, body)
        assert response.status_code == 204, response.text


@pytest.fixture
async def double() -> AsyncIterator[Double]:
    root = Path(tempfile.mkdtemp(prefix="hvd-", dir="/tmp"))
    sock = root / "api.sock"
    process = await asyncio.create_subprocess_exec(
        str(launcher(root)), "--api-sock", str(sock), "--id", "double-test"
    )
    deadline = asyncio.get_running_loop().time() + 60  # Python: slow on a busy machine
    while not sock.exists():
        assert process.returncode is None and asyncio.get_running_loop().time() < deadline
        await asyncio.sleep(0.02)
    made = Double(root, process, sock)
    try:
        yield made
    finally:
        await made.client.aclose()
        if process.returncode is None:
            process.kill()
        await process.wait()
        shutil.rmtree(root, ignore_errors=True)


def _configure(d: Double) -> list[tuple[str, str, dict[str, object]]]:
    files = _dummy_files(d.root)
    return [
        ("PUT", "/boot-source", {"kernel_image_path": str(files["vmlinux"])}),
        ("PUT", "/machine-config", {"vcpu_count": 1, "mem_size_mib": 128}),
        (
            "PUT",
            "/drives/base",
            {
                "drive_id": "base",
                "is_root_device": False,
                "path_on_host": str(files["rootfs"]),
                "is_read_only": True,
            },
        ),
    ]


async def test_unknown_fields_wrong_types_and_missing_fields_are_400(double: Double) -> None:
    fault = await double.fault(
        "PUT", "/machine-config", {"vcpu_count": 1, "mem_size_mib": 1, "x": 1}
    )
    assert "'x' was unexpected" in fault
    fault = await double.fault("PUT", "/machine-config", {"vcpu_count": "2", "mem_size_mib": 128})
    assert 'vcpu_count: "2" is not of type "integer"' in fault
    fault = await double.fault("PUT", "/machine-config", {"vcpu_count": 33, "mem_size_mib": 128})
    assert "vcpu_count" in fault
    assert "kernel_image_path" in await double.fault("PUT", "/boot-source", {})
    fault = await double.fault("PUT", "/actions", {"action_type": "Reboot"})
    assert "Reboot" in fault
    assert "Invalid request method and/or path" in await double.fault("PUT", "/no-such-thing", {})
    response = await double.client.put("/logger", content=b"{not json")
    assert response.status_code == 400 and "deserializing" in response.json()["fault_message"]


async def test_files_are_checked_when_configured(double: Double) -> None:
    fault = await double.fault("PUT", "/boot-source", {"kernel_image_path": "/no/such/vmlinux"})
    assert "No such file" in fault
    nic = {"iface_id": "eth0", "host_dev_name": "no-such-tap0"}
    assert "Open tap device failed" in await double.fault("PUT", "/network-interfaces/eth0", nic)
    nic = {"iface_id": "eth1", "host_dev_name": "lo"}
    assert "does not match" in await double.fault("PUT", "/network-interfaces/eth0", nic)


async def test_the_boot_phases_are_enforced(double: Double) -> None:
    assert "before starting" in await double.fault("PATCH", "/vm", {"state": "Paused"})
    snap = {"snapshot_path": str(double.root / "s"), "mem_file_path": str(double.root / "m")}
    assert "before starting" in await double.fault("PUT", "/snapshot/create", snap)
    assert "Missing kernel" in await double.fault(
        "PUT", "/actions", {"action_type": "InstanceStart"}
    )
    for method, path, body in _configure(double):
        await double.ok(method, path, body)
    load = {
        "snapshot_path": str(double.root / "s"),
        "mem_backend": {"backend_type": "File", "backend_path": str(double.root / "m")},
    }
    assert "not allowed after configuring boot-specific" in await double.fault(
        "PUT", "/snapshot/load", load
    )
    await double.ok("PUT", "/actions", {"action_type": "InstanceStart"})
    for method, path, body in _configure(double):
        assert "after starting" in await double.fault(method, path, body)
    assert "after starting" in await double.fault(
        "PUT", "/actions", {"action_type": "InstanceStart"}
    )
    assert "not paused" in await double.fault("PUT", "/snapshot/create", snap)
    await double.ok("PATCH", "/vm", {"state": "Paused"})
    await double.ok("PUT", "/snapshot/create", snap)
    assert os.path.getsize(double.root / "m") == 128 << 20
    state = (await double.call("GET", "/")).json()["state"]
    assert state == "Paused"


async def test_a_failed_snapshot_load_ends_the_process(double: Double) -> None:
    await double.ok("PUT", "/logger", {"log_path": str(double.root / "log")})  # allowed first
    (double.root / "state").write_text("garbage")
    (double.root / "mem").write_bytes(b"")
    load = {
        "snapshot_path": str(double.root / "state"),
        "mem_backend": {"backend_type": "File", "backend_path": str(double.root / "mem")},
    }
    assert "Failed to restore from snapshot" in await double.fault("PUT", "/snapshot/load", load)
    assert await asyncio.wait_for(double.process.wait(), 10) == 1


def test_the_drivers_bodies_are_valid_for_the_swagger_file() -> None:
    """Every request model the driver sends, filled as the driver fills it, passes the schema
    of its path in Firecracker's swagger file (the double's validator)."""
    routes = {(r.method, r.template): r for r in load_routes()}
    bodies = {
        ("PUT", "/boot-source"): fc_models.BootSource(
            kernel_image_path="/k", initrd_path="/i", boot_args="console=ttyS0"
        ),
        ("PUT", "/drives/{drive_id}"): fc_models.Drive(
            drive_id="base", is_root_device=False, path_on_host="/r", is_read_only=True
        ),
        ("PUT", "/machine-config"): fc_models.MachineConfiguration(
            vcpu_count=2, mem_size_mib=256, smt=False
        ),
        ("PUT", "/network-interfaces/{iface_id}"): fc_models.NetworkInterface(
            iface_id="eth0", host_dev_name="tap0", guest_mac="02:00:00:00:00:01"
        ),
        ("PUT", "/logger"): fc_models.Logger(log_path="/l", level="Warning"),
        ("PUT", "/metrics"): fc_models.Metrics(metrics_path="/m"),
        ("PUT", "/serial"): fc_models.SerialDevice(serial_out_path="/s"),
        ("PUT", "/entropy"): fc_models.EntropyDevice(),
        ("PUT", "/actions"): fc_models.InstanceActionInfo(action_type="SendCtrlAltDel"),
        ("PATCH", "/vm"): fc_models.Vm(state="Paused"),
        ("PUT", "/snapshot/create"): fc_models.SnapshotCreateParams(
            snapshot_type="Full", snapshot_path="/s", mem_file_path="/m"
        ),
        ("PUT", "/snapshot/load"): fc_models.SnapshotLoadParams(
            snapshot_path="/s",
            mem_backend=fc_models.MemoryBackend(backend_type="File", backend_path="/m"),
            resume_vm=False,
        ),
    }
    for key, model in bodies.items():
        schema = routes[key].schema
        assert schema is not None, key
        errors = [e.message for e in schema.iter_errors(model.body())]
        assert errors == [], (key, errors)


async def test_a_refusal_names_the_vm_and_the_call() -> None:
    root = Path(tempfile.mkdtemp(prefix="hvd-", dir="/tmp"))
    try:
        vmm = FirecrackerVMM(str(launcher(root)), root / "run", kvm_usable=False, start_timeout=60)
        files = _dummy_files(root)
        vm_dir = root / "vms" / "vm_refused"
        vm_dir.mkdir(parents=True)
        (vm_dir / "disk").write_bytes(b"\0")
        spec = BootSpec(
            vm_id="vm_refused",
            vm_dir=vm_dir,
            kernel=files["kernel"],
            vmlinux=files["vmlinux"],
            initrd=None,
            rootfs=files["rootfs"],
            disk=vm_dir / "disk",
            vcpu_count=1,
            mem_mib=128,
            cmdline="console=ttyS0",
            tap_name="hvnosuchtap",
            guest_mac="02:00:00:00:00:01",
        )
        with pytest.raises(VMMRequestFailed) as err:
            await vmm.boot(spec)
        assert str(err.value) == (
            "PUT /network-interfaces/eth0 of vm_refused: firecracker refused it (400): "
            "Network interface error: Could not create the network device: Open tap device "
            "failed: hvnosuchtap"
        )
        assert err.value.vm_id == "vm_refused" and err.value.op == "PUT /network-interfaces/eth0"
        assert await vmm.alive("vm_refused", vm_dir) is None
    finally:
        shutil.rmtree(root, ignore_errors=True)
