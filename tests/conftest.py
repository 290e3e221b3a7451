"""Test session set-up: build the guest image (network needed), then leave the machine's own
network namespace for a fresh one, so every bridge, TAP and VM of the suite stays inside it
(under pytest-xdist, one namespace per worker)."""

from __future__ import annotations

import os
import shutil
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING

import pytest

from tests.support.daemon import LOG_DIR, WORKER_PREFIX
from tests.support.netns import enter_fresh_netns, in_initial_netns

if TYPE_CHECKING:
    from tests.support.postgres import PostgresServer

DATABASES = ["sqlite", "postgresql"]

_VM_SKIP_REASON: str | None = None


def _vm_prerequisites() -> str | None:
    if os.geteuid() != 0:
        return "VM tests need root (bridges, TAPs, nftables)"
    for tool in ("qemu-system-x86_64", "nft", "ip", "mkfs.ext4"):
        if shutil.which(tool) is None:
            return f"{tool} is not installed (run scripts/setup)"
    if os.environ.get("HATCH_TEST_VMM") == "firecracker":
        return _firecracker_prerequisites()
    return None


def _firecracker_prerequisites() -> str | None:
    """HATCH_TEST_VMM=firecracker runs the VM tests on a real Firecracker: it needs the binary
    and a host where KVM really runs guests."""
    import asyncio

    from hatchvm.vmm.accel import probe

    binary = os.environ.get("HATCH_FIRECRACKER_BIN", "firecracker")
    if shutil.which(binary) is None:
        return f"HATCH_TEST_VMM=firecracker but {binary} is not found (set HATCH_FIRECRACKER_BIN)"
    if not os.access("/dev/kvm", os.R_OK | os.W_OK):
        return "HATCH_TEST_VMM=firecracker but /dev/kvm is missing or not accessible"
    if (problem := asyncio.run(probe("qemu-system-x86_64", "kvm"))) is not None:
        return f"HATCH_TEST_VMM=firecracker but KVM does not run guests here: {problem}"
    return None


def pytest_configure(config: pytest.Config) -> None:
    global _VM_SKIP_REASON
    _VM_SKIP_REASON = _vm_prerequisites()
    if _VM_SKIP_REASON is None and os.environ.get("HATCH_TEST_SKIP_IMAGE") != "1":
        try:
            from tests.support.image import ensure_test_image

            ensure_test_image()
        except Exception as exc:  # a build failure must show, but unit tests can still run
            _VM_SKIP_REASON = f"default image could not be built: {exc}"
    # Each xdist worker takes a namespace of its own: bridges, TAPs, tables and loopback ports
    # named alike by two workers never meet.
    if os.geteuid() == 0 and (in_initial_netns() or os.environ.get("PYTEST_XDIST_WORKER")):
        enter_fresh_netns()


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    if _VM_SKIP_REASON is None:
        return
    skip = pytest.mark.skip(reason=_VM_SKIP_REASON)
    for item in items:
        if "vm" in item.keywords:
            item.add_marker(skip)


def pytest_generate_tests(metafunc: pytest.Metafunc) -> None:
    # A test marked `postgres` runs once per database hatchd supports; the others on SQLite.
    if "database" in metafunc.fixturenames and metafunc.definition.get_closest_marker("postgres"):
        metafunc.parametrize("database", DATABASES, indirect=True)


@pytest.fixture(scope="session")
def postgres_server() -> Iterator[PostgresServer]:
    """One PostgreSQL server for the whole session, started on first use."""
    from tests.support.postgres import skip_reason, start_postgres

    reason = skip_reason()
    if reason is not None:
        pytest.skip(reason)
    server = start_postgres()
    yield server
    server.stop(keep_log=LOG_DIR / f"{WORKER_PREFIX}postgres.log")


@pytest.fixture
def database(request: pytest.FixtureRequest) -> str:
    """The database hatchd runs on in this test: "sqlite" (default) or "postgresql"."""
    return str(getattr(request, "param", "sqlite"))


@pytest.fixture
def database_url(request: pytest.FixtureRequest, database: str, tmp_path: Path) -> Iterator[str]:
    """A fresh, empty database of that kind, as HATCH_DATABASE_URL names it."""
    if database == "sqlite":
        yield f"sqlite:///{tmp_path / 'hatchvm.db'}"
        return
    server: PostgresServer = request.getfixturevalue("postgres_server")
    name = server.create_database()
    yield server.socket_url(name)
    server.drop_database(name)


@pytest.fixture
def daemon_factory(request: pytest.FixtureRequest, database: str) -> Iterator[object]:
    from tests.support.daemon import HatchDaemon

    server: PostgresServer | None = None
    if database == "postgresql":
        server = request.getfixturevalue("postgres_server")
    made: list[HatchDaemon] = []
    databases: list[str] = []

    def make(**env: str) -> HatchDaemon:
        if server is not None and "HATCH_DATABASE_URL" not in env:
            databases.append(server.create_database())
            env["HATCH_DATABASE_URL"] = server.socket_url(databases[-1])
        d = HatchDaemon(**env)
        made.append(d)
        return d

    yield make
    for d in made:
        d.cleanup()
    for name in databases:
        assert server is not None
        server.drop_database(name)
