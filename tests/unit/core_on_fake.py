"""core's real services (VMService, SnapshotService, WakeService, the reaper, reconciliation)
on the fake VMM driver, a SQLite database and a local snapshot store in a temporary directory:
no guest boots, so their error paths get fast tests."""

from __future__ import annotations

import asyncio
import hashlib
import json
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path

from hatchvm.config import Settings, load_settings
from hatchvm.core.activity import Activity
from hatchvm.core.console import Consoles
from hatchvm.core.liveness import Liveness
from hatchvm.core.snapshots import SnapshotService
from hatchvm.core.vms import VMConfig, VMService
from hatchvm.core.wake import WakeService
from hatchvm.db.engine import make_engine, make_sessionmaker
from hatchvm.db.migrate import upgrade
from hatchvm.db.models import VM
from hatchvm.ids import DEFAULT_IMAGE_ID
from hatchvm.images.builder import BUILDER_VERSION, content_version, load_artifacts
from hatchvm.images.registry import register
from hatchvm.metrics import Metrics
from hatchvm.net.egress import Egress
from hatchvm.snapshots.local import LocalStore
from hatchvm.vmm.base import Feature
from hatchvm.vmm.fake import FakeHost, FakeVMM

USER = "alice"


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


@dataclass
class Core:
    settings: Settings
    host: FakeHost
    vms: VMService
    snapshots: SnapshotService
    wake: WakeService
    liveness: Liveness
    activity: Activity
    clock: Clock

    async def create(self) -> VM:
        cfg = VMConfig(
            image_id=DEFAULT_IMAGE_ID,
            vcpu_count=1,
            mem_mib=128,
            enable_network=False,
            egress=Egress.INTERNET,
            user_data=None,
            boot_args=None,
        )
        return await self.vms.create(USER, cfg)

    async def state(self, vm_id: str) -> VM:
        vm = await self.vms.load(vm_id)
        assert vm is not None
        return vm


def placeholder_build(out: Path, **fields: object) -> dict[str, object]:
    """A complete image build in out whose files are placeholders (the fake driver reads none
    of them); its manifest, with fields added."""
    files = {}
    out.mkdir(parents=True)
    for role, name in (
        ("kernel", "vmlinuz"),
        ("vmlinux", "vmlinux"),
        ("initrd", "initrd.img"),
        ("rootfs", "rootfs.ext4"),
    ):
        data = f"placeholder {role}".encode()
        (out / name).write_bytes(data)
        files[role] = {"file": name, "size": len(data), "sha256": hashlib.sha256(data).hexdigest()}
    manifest = {
        "files": files,
        "boot_args": "console=ttyS0",
        "kernel_version": "6.1.0-fake",
        "builder_version": BUILDER_VERSION,
        **fields,
    }
    (out / "manifest.json").write_text(json.dumps(manifest))
    return manifest


def _fake_image(image_dir: Path) -> None:
    """An image version of placeholder files."""
    staging = image_dir / "staging"
    manifest = placeholder_build(staging)
    staging.rename(image_dir / content_version(manifest))


async def make_core(
    tmp: Path,
    features: Feature = Feature.SNAPSHOTS,
    metrics: Metrics | None = None,
    **settings_overrides: object,
) -> AsyncIterator[Core]:
    settings = load_settings(
        data_dir=tmp / "data",
        run_dir=tmp / "run",
        cgroups="off",
        vm_disk_mib=64,
        host_mem_reserve_mib=0,
        host_disk_reserve_mib=0,
        **settings_overrides,
    )
    settings.vms_dir.mkdir(parents=True)
    engine = make_engine(settings.sqlalchemy_url)
    await upgrade(engine)
    sessions = make_sessionmaker(engine)
    image_dir = settings.images_dir / DEFAULT_IMAGE_ID
    _fake_image(image_dir)
    (version,) = [p for p in image_dir.iterdir() if p.is_dir()]
    artifacts = load_artifacts(version)
    assert artifacts is not None
    await register(sessions, DEFAULT_IMAGE_ID, artifacts)
    host = FakeHost()
    consoles = Consoles(settings.console_max_bytes)
    vms = VMService(settings, sessions, FakeVMM(host, features), None, consoles)
    liveness = Liveness(vms, metrics)
    snapshots = SnapshotService(settings, vms, LocalStore(settings.snapshots_dir), metrics)
    clock = Clock()
    wake = WakeService(vms, snapshots, max_failures=3, backoff=5.0, clock=clock, metrics=metrics)
    core = Core(settings, host, vms, snapshots, wake, liveness, Activity(vms), clock)
    try:
        yield core
    finally:
        # Every task that may touch the database ends before it goes (a watch cancelled in
        # the middle of a query would keep the connection busy and the loop from closing).
        tasks = [*liveness._watches.values(), *liveness._restarts.values()]
        tasks += list(core.activity._pending)
        await liveness.close()
        await asyncio.gather(*tasks, return_exceptions=True)
        await consoles.close()
        await engine.dispose()
