"""The hatchvm proxy as bench/proxy.py measures it: the real Proxy, RouteService and VMService
on a real SQLite database holding one running VM whose "guest" is an upstream on loopback.

Usage (started by bench/proxy.py): proxy_target.py DATA_DIR PROXY_PORT UPSTREAM_PORT
"""

from __future__ import annotations

import asyncio
import sys
from pathlib import Path

import uvloop

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from hatchvm.config import Settings
from hatchvm.core.activity import Activity
from hatchvm.core.console import Consoles
from hatchvm.core.routes import RouteService
from hatchvm.core.snapshots import SnapshotService
from hatchvm.core.vms import VMService
from hatchvm.core.wake import WakeService
from hatchvm.db.engine import make_engine, make_sessionmaker
from hatchvm.db.migrate import upgrade
from hatchvm.db.models import VM, Image
from hatchvm.proxy.server import Proxy
from hatchvm.snapshots.local import LocalStore
from hatchvm.vmm.qemu import QemuVMM


async def serve(data_dir: Path, proxy_port: int, upstream_port: int) -> None:
    data_dir.mkdir(parents=True, exist_ok=True)
    settings = Settings(
        data_dir=data_dir, proxy_addr=f"127.0.0.1:{proxy_port}", log_level="warning"
    )
    engine = make_engine(settings.sqlalchemy_url)
    await upgrade(engine)
    sessions = make_sessionmaker(engine)
    async with sessions() as session, session.begin():
        session.add(Image(id="img_bench", kernel_path="-", rootfs_path="-"))
        session.add(
            VM(
                id="vm_bench",
                user_id="bench",
                image_id="img_bench",
                state="running",
                vcpu_count=1,
                mem_mib=128,
                enable_network=True,
                guest_ip="127.0.0.1",
            )
        )
    vmm = QemuVMM("qemu-system-x86_64", "tcg", settings.run_dir)
    vms = VMService(settings, sessions, vmm, None, Consoles(settings.console_max_bytes))
    routes = RouteService(settings, vms)
    await routes.create("bench", "vm_bench", "bench", upstream_port, True)
    snapshots = SnapshotService(settings, vms, LocalStore(settings.snapshots_dir))
    proxy = Proxy(settings, vms, routes, WakeService(vms, snapshots), Activity(vms))
    await proxy.start()
    await asyncio.Event().wait()


if __name__ == "__main__":
    uvloop.run(serve(Path(sys.argv[1]), int(sys.argv[2]), int(sys.argv[3])))
