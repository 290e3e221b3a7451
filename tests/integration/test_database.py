"""The database layer on each database hatchd supports: SQLite and a real PostgreSQL server.

Every repository query, every migration (from an empty database and from each older revision),
the unique indexes that decide allocation and subdomain races, and timestamps, without VMs."""

from __future__ import annotations

import asyncio
import os
import subprocess
import sys
from collections.abc import AsyncIterator
from datetime import UTC, datetime, timedelta, timezone
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest
from alembic.script import ScriptDirectory
from sqlalchemy import event, text
from sqlalchemy.exc import IntegrityError
from sqlalchemy.ext.asyncio import AsyncEngine, async_sessionmaker

from hatchvm.config import load_settings
from hatchvm.core.states import State
from hatchvm.core.vms import VMConfig, VMService
from hatchvm.db import migrate, repo
from hatchvm.db.engine import make_engine, make_sessionmaker
from hatchvm.db.models import VM, ApiKey, Image, Route, Snapshot
from hatchvm.ids import new_id
from hatchvm.net.alloc import tap_name
from hatchvm.net.egress import Egress
from hatchvm.snapshots.local import LocalStore
from hatchvm.snapshots.s3 import S3Store

pytestmark = pytest.mark.postgres

REVISIONS = [
    s.revision
    for s in reversed(list(ScriptDirectory.from_config(migrate._config()).walk_revisions()))
]
HEAD = REVISIONS[-1]


@pytest.fixture
async def engine(database_url: str, tmp_path) -> AsyncIterator[AsyncEngine]:
    settings = load_settings(database_url=database_url, data_dir=tmp_path)
    eng = make_engine(settings.sqlalchemy_url)
    yield eng
    await eng.dispose()


@pytest.fixture
async def sessions(engine: AsyncEngine) -> async_sessionmaker[Any]:
    await migrate.upgrade(engine)
    return make_sessionmaker(engine)


def at(second: int, micro: int = 0) -> datetime:
    return datetime(2026, 3, 6, 12, 0, second, micro, tzinfo=UTC)


def image(image_id: str = "img_default", created: datetime | None = None) -> Image:
    return Image(
        id=image_id,
        kernel_path="/k",
        rootfs_path="/r",
        boot_args="",
        created_at=created or at(0),
    )


def vm(vm_id: str, user: str = "alice", n: int | None = None, **fields: Any) -> VM:
    """A VM row; n gives it allocations (IP, MAC, TAP, SSH port) derived from n."""
    row = VM(
        id=vm_id,
        user_id=user,
        image_id="img_default",
        state="running",
        vcpu_count=1,
        mem_mib=256,
        enable_network=n is not None,
        **fields,
    )
    if n is not None:
        row.guest_ip = f"172.16.9.{n}"
        row.guest_mac = f"02:00:00:00:00:{n:02x}"
        row.tap_name = f"tp{vm_id[-6:]}"
        row.ssh_port = 20000 + n
    return row


def snapshot(snap_id: str, vm_id: str, created: datetime, automatic: bool = False) -> Snapshot:
    return Snapshot(
        id=snap_id,
        vm_id=vm_id,
        user_id="alice",
        size_bytes=5 << 30,  # past 32 bits
        storage="local",
        location=f"/snapshots/{vm_id}/{snap_id}",
        manifest='{"version": 1, "artifacts": {"mem": {"sha256": "ab"}}, "note": "é ✓"}',
        automatic=automatic,
        created_at=created,
    )


def route(route_id: str, vm_id: str, subdomain: str, created: datetime) -> Route:
    return Route(
        id=route_id,
        vm_id=vm_id,
        user_id="alice",
        subdomain=subdomain,
        target_port=8080,
        auto_wake=True,
        created_at=created,
        updated_at=created,
    )


async def add(sessions: async_sessionmaker[Any], *rows: object) -> None:
    async with sessions() as session, session.begin():
        session.add_all(rows)


# ---- migrations ---------------------------------------------------------------------------


async def _version(engine: AsyncEngine) -> str | None:
    async with engine.connect() as conn:
        return (await conn.execute(text("SELECT version_num FROM alembic_version"))).scalar()


def test_revisions_are_known() -> None:
    assert REVISIONS[0] == "0001" and len(REVISIONS) >= 5


@pytest.mark.parametrize("start", [None, *REVISIONS[:-1]], ids=lambda r: f"from-{r or 'empty'}")
async def test_upgrade_to_head_keeps_rows_and_fills_defaults(engine: AsyncEngine, start) -> None:
    """A database left at any older revision (with rows in it) upgrades to head."""
    if start is not None:
        await migrate.upgrade(engine, start)
        assert await _version(engine) == start
        async with engine.begin() as conn:
            await conn.execute(
                text(
                    "INSERT INTO images (id, kernel_path, rootfs_path, boot_args, created_at) "
                    "VALUES ('img_default', '/k', '/r', '', :t)"
                ),
                {"t": at(1, 500)},
            )
            await conn.execute(
                text(
                    "INSERT INTO vms (id, user_id, image_id, state, vcpu_count, mem_mib, "
                    "enable_network, guest_ip, ssh_port, last_activity_at, created_at, "
                    "updated_at) VALUES ('vm_old', 'alice', 'img_default', 'running', 1, 256, "
                    "true, '172.16.9.2', 20002, :t, :t, :t)"
                ),
                {"t": at(1, 500)},
            )
    await migrate.upgrade(engine)
    assert await _version(engine) == HEAD
    sessions = make_sessionmaker(engine)
    async with sessions() as session:
        old = await repo.get_vm(session, "vm_old")
    if start is None:
        assert old is None
        return
    assert old is not None
    # VMs made before 0004 keep the internet they had; before 0005 they never restart.
    assert (old.egress, old.restart, old.last_exit) == ("internet", "no", None)
    assert old.created_at == at(1, 500) and old.created_at.tzinfo is not None
    # The upgraded schema takes every kind of row.
    await add(
        sessions,
        snapshot("snap_a", "vm_old", at(2)),
        route("rt_a", "vm_old", "app", at(2)),
        ApiKey(id="key_a", user_id="alice", prefix="hatch_abcd", key_hash="h" * 64),
    )


async def test_downgrade_to_empty_and_up_again(engine: AsyncEngine) -> None:
    await migrate.upgrade(engine)
    await migrate.downgrade(engine, "base")
    async with engine.connect() as conn:
        tables = await conn.run_sync(
            lambda c: sorted(__import__("sqlalchemy").inspect(c).get_table_names())
        )
    assert tables == ["alembic_version"]
    await migrate.upgrade(engine)
    assert await _version(engine) == HEAD


async def test_downgrade_and_upgrade_keep_every_row(engine: AsyncEngine) -> None:
    """Regression: on SQLite, 0005's downgrade rebuilds the vms table, and dropping the old
    one with foreign keys on deleted every snapshot and route (ON DELETE CASCADE)."""
    await migrate.upgrade(engine)
    sessions = make_sessionmaker(engine)
    await add(sessions, image(), vm("vm_a", n=2))
    await add(sessions, snapshot("snap_a", "vm_a", at(1)), route("rt_a", "vm_a", "a", at(1)))
    for revision in reversed(REVISIONS[2:-1]):  # down to 0003, the first with routes
        await migrate.downgrade(engine, revision)
        async with engine.connect() as conn:
            for table in ("vms", "snapshots", "routes"):
                count = (await conn.execute(text(f"SELECT count(*) FROM {table}"))).scalar()
                assert count == 1, (revision, table)
    await migrate.upgrade(engine)
    async with sessions() as s:
        assert await repo.count_restorable(s, "vm_a") == 1
        assert [r.id for r in await repo.list_routes(s, "vm_a")] == ["rt_a"]
    # Foreign keys are enforced again on the connections the migrations used.
    for _ in range(3):
        with pytest.raises(IntegrityError):
            await add(sessions, snapshot(new_id("snap"), "vm_nope", at(2)))


# Imports everything first, then waits for its standard input to close, so the processes
# reach the migrations together (a wait with no deadline of its own: the test's
# wait(120) bounds it); then does what `hatchvm keys list` does.
_MIGRATE_AT_ONCE = """
import asyncio, sys
from hatchvm import admin
from hatchvm.config import load_settings
settings = load_settings()
print("ready", flush=True)
sys.stdin.read()
print(len(asyncio.run(admin.list_keys(settings))))
"""


def test_concurrent_upgrades_of_an_empty_database(database_url: str, tmp_path) -> None:
    """hatchd and `hatchvm keys ...` (or two daemons) may migrate one new database at once:
    each process runs the migrations at start, so they must wait for one another."""
    env = {**os.environ, "HATCH_DATABASE_URL": database_url, "HATCH_DATA_DIR": str(tmp_path)}
    procs = [
        subprocess.Popen(
            [sys.executable, "-c", _MIGRATE_AT_ONCE],
            env=env,
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for _ in range(4)
    ]
    for proc in procs:
        assert proc.stdout is not None and proc.stdout.readline() == "ready\n"
    for proc in procs:  # all waiting: let them go
        assert proc.stdin is not None
        proc.stdin.close()
    for proc in procs:
        assert proc.wait(120) == 0, proc.stderr.read()[-2000:] if proc.stderr else ""
        assert proc.stdout is not None and proc.stdout.read().strip() == "0"


# ---- how hatchd is pointed at PostgreSQL --------------------------------------------------


async def _select_one(database_url: str, tmp_path: Path) -> int:
    eng = make_engine(load_settings(database_url=database_url, data_dir=tmp_path).sqlalchemy_url)
    try:
        async with eng.connect() as conn:
            return int((await conn.execute(text("SELECT 1"))).scalar_one())
    finally:
        await eng.dispose()


def test_every_documented_url_form_reaches_postgresql(postgres_server, tmp_path) -> None:
    name = postgres_server.create_database()
    tcp = postgres_server.tcp_url(name)
    for url in (
        postgres_server.socket_url(name),  # postgresql://USER@/DB?host=/SOCKET/DIR&port=N
        tcp,  # postgresql://USER@127.0.0.1:N/DB
        tcp.replace("postgresql://", "postgres://", 1),
        tcp.replace("postgresql://", "postgresql+asyncpg://", 1),
        tcp + "?sslmode=disable",
    ):
        assert asyncio.run(_select_one(url, tmp_path)) == 1, url
    # This server has no TLS: sslmode=require must get as far as asking it (it was a TypeError
    # from asyncpg, which has no sslmode parameter).
    with pytest.raises(ConnectionError, match="SSL"):
        asyncio.run(_select_one(tcp + "?sslmode=require", tmp_path))
    postgres_server.drop_database(name)


def test_connections_postgresql_dropped_are_replaced(postgres_server, tmp_path) -> None:
    """A server restart, a failover or an idle timeout ends pooled connections behind hatchd's
    back; the next request must get a fresh one, not a 500."""
    name = postgres_server.create_database()
    url = load_settings(database_url=postgres_server.socket_url(name), data_dir=tmp_path)

    async def scenario() -> None:
        eng = make_engine(url.sqlalchemy_url)
        try:
            await migrate.upgrade(eng)
            sessions = make_sessionmaker(eng)
            await add(sessions, image())
            async with sessions() as s:
                assert await repo.get_image(s, "img_default") is not None
            ended = await postgres_server.terminate_backends(name)
            assert ended >= 1  # the pooled connection was really cut
            async with sessions() as s:
                assert await repo.get_image(s, "img_default") is not None
        finally:
            await eng.dispose()

    asyncio.run(scenario())
    postgres_server.drop_database(name)


# ---- repository queries -------------------------------------------------------------------


async def test_every_repository_query(sessions: async_sessionmaker[Any]) -> None:
    await add(sessions, image("img_default", at(0)), image("img_other", at(5)))
    await add(
        sessions,
        vm("vm_a1", "alice", 2, created_at=at(1)),
        vm("vm_a2", "alice", None, created_at=at(3)),
        vm("vm_b1", "bob", 3, created_at=at(2)),
    )
    await add(
        sessions,
        snapshot("snap_1", "vm_a1", at(10, 1), automatic=True),
        snapshot("snap_2", "vm_a1", at(10, 2)),
        snapshot("snap_3", "vm_a2", at(11)),
        route("rt_1", "vm_a1", "one", at(20, 7)),
        route("rt_2", "vm_a1", "two", at(20, 8)),
        route("rt_3", "vm_b1", "three", at(21)),
        ApiKey(id="key_1", user_id="alice", prefix="p1", key_hash="1" * 64, created_at=at(30)),
        ApiKey(id="key_2", user_id="bob", prefix="p2", key_hash="2" * 64, created_at=at(31)),
    )
    async with sessions() as s:
        got = await repo.get_vm(s, "vm_a1")
        assert got is not None and got.guest_ip == "172.16.9.2"
        assert await repo.get_vm(s, "vm_nope") is None
        assert [v.id for v in await repo.list_vms(s)] == ["vm_a2", "vm_b1", "vm_a1"]
        assert [v.id for v in await repo.list_vms(s, "alice")] == ["vm_a2", "vm_a1"]
        assert await repo.list_vms(s, "carol") == []
        assert (await repo.user_totals(s, "carol")) == (0, 0, 0)
        count, vcpus, mem = await repo.user_totals(s, "alice")
        assert count == 2 and vcpus > 0 and mem > 0
        assert await repo.snapshot_bytes(s, "alice") == 3 * (5 << 30)  # sums past 32 bits
        assert await repo.snapshot_bytes(s, "carol") == 0
        ips, macs, ports = await repo.used_allocations(s)
        assert ips == {"172.16.9.2", "172.16.9.3"} and ports == {20002, 20003}
        assert macs == {"02:00:00:00:00:02", "02:00:00:00:00:03"}

        img = await repo.get_image(s, "img_other")
        assert img is not None and img.created_at == at(5)
        assert await repo.get_image(s, "img_nope") is None
        assert [i.id for i in await repo.list_images(s)] == ["img_other", "img_default"]

        key = await repo.key_by_hash(s, "2" * 64)
        assert key is not None and key.user_id == "bob"
        assert await repo.key_by_hash(s, "3" * 64) is None
        assert [k.id for k in await repo.list_keys(s)] == ["key_2", "key_1"]

        # Newest first, microseconds apart.
        assert [x.id for x in await repo.list_snapshots(s, "vm_a1")] == ["snap_2", "snap_1"]
        assert await repo.list_snapshots(s, "vm_b1") == []
        snap = await repo.get_snapshot(s, "snap_1")
        assert snap is not None and snap.created_at == at(10, 1) and snap.automatic is True
        assert snap.size_bytes == 5 << 30 and "é ✓" in snap.manifest
        assert await repo.get_snapshot(s, "snap_nope") is None
        assert await repo.count_restorable(s, "vm_a1") == 2
        assert await repo.count_restorable(s, "vm_b1") == 0

        assert [r.id for r in await repo.list_routes(s, "vm_a1")] == ["rt_2", "rt_1"]
        r1 = await repo.get_route(s, "rt_1")
        assert r1 is not None and r1.subdomain == "one"
        assert await repo.get_route(s, "rt_nope") is None
        found = await repo.route_by_subdomain(s, "three")
        assert found is not None and found.vm_id == "vm_b1"
        assert await repo.route_by_subdomain(s, "nope") is None
        assert sorted(r.id for r in await repo.all_routes(s)) == ["rt_1", "rt_2", "rt_3"]

    # Deleting a VM row takes its snapshots and routes with it (ON DELETE CASCADE).
    async with sessions() as s, s.begin():
        await s.execute(text("DELETE FROM vms WHERE id = 'vm_a1'"))
    async with sessions() as s:
        assert await repo.count_restorable(s, "vm_a1") == 0
        assert await repo.list_routes(s, "vm_a1") == []


async def test_an_id_no_row_can_hold_finds_nothing(sessions: async_sessionmaker[Any]) -> None:
    """Regression: /vms/vm_%00 was a 500 on PostgreSQL (its text refuses NUL), 404 on SQLite."""
    await add(sessions, image(), vm("vm_a"))
    nul = "vm_a\x00"
    async with sessions() as s:
        for lookup in (
            repo.get_vm,
            repo.get_image,
            repo.get_snapshot,
            repo.get_route,
            repo.key_by_hash,
            repo.route_by_subdomain,
        ):
            assert await lookup(s, nul) is None, lookup.__name__


async def test_timestamps_are_utc_and_keep_microseconds(sessions: async_sessionmaker[Any]) -> None:
    """Whatever zone a datetime comes in (or the server's session runs in), it is stored as
    the same instant and read back aware, in UTC, to the microsecond."""
    await add(sessions, image())
    chatham = timezone(timedelta(hours=12, minutes=45))
    given = {
        "vm_utc": at(1, 123456),
        "vm_naive": at(2, 654321).replace(tzinfo=None),  # taken as UTC
        "vm_zone": at(3, 1).astimezone(chatham),
    }
    await add(
        sessions, *(vm(i, created_at=t, updated_at=t, last_activity_at=t) for i, t in given.items())
    )
    async with sessions() as s:
        for vm_id, expected in [
            ("vm_utc", at(1, 123456)),
            ("vm_naive", at(2, 654321)),
            ("vm_zone", at(3, 1)),
        ]:
            row = await repo.get_vm(s, vm_id)
            assert row is not None
            for value in (row.created_at, row.updated_at, row.last_activity_at):
                assert value == expected and value.utcoffset() == timedelta(0), (vm_id, value)
        # Compared in SQL too, not only in Python.
        cutoff = at(2, 654322)
        older = await s.scalars(
            text("SELECT id FROM vms WHERE created_at < :c ORDER BY id"), {"c": cutoff}
        )
        assert list(older) == ["vm_naive", "vm_utc"]


async def test_the_longest_values_hatchd_writes_fit_their_columns(sessions) -> None:
    """PostgreSQL enforces VARCHAR lengths (SQLite does not): every state, egress, restart
    policy, storage backend, TAP name and user id hatchd may write fits."""
    longest = max(State, key=len)
    user = "u" * 128  # the longest user id admin and the Better Auth verifier accept
    await add(sessions, image())
    big = vm("vm_" + "z" * 12, user, 254, egress=max(Egress, key=len).value, restart="on-failure")
    big.state = longest.value
    await add(
        sessions,
        big,
        ApiKey(id=new_id("key"), user_id=user, prefix="hatch_" + "k" * 4, key_hash="f" * 64),
    )
    row = vm("vm_" + "y" * 12, n=253)
    row.tap_name = tap_name("abcd", row.id)  # the longest HATCH_TAP_PREFIX
    await add(sessions, row)
    for backend in (LocalStore.backend, S3Store.backend):
        await add(sessions, snapshot(new_id("snap"), row.id, at(1)))
        async with sessions() as s, s.begin():
            await s.execute(text("UPDATE snapshots SET storage = :b"), {"b": backend})
    await add(sessions, route(new_id("rt"), row.id, "s" * 63, at(1)))


# ---- unique indexes: the database decides races -------------------------------------------


@pytest.mark.parametrize("column", ["guest_ip", "guest_mac", "tap_name", "ssh_port"])
async def test_a_taken_allocation_is_an_integrity_error(sessions, column: str) -> None:
    await add(sessions, image(), vm("vm_first1", n=2))
    clash = vm("vm_second", n=3)
    setattr(clash, column, getattr(vm("vm_first1", n=2), column))
    with pytest.raises(IntegrityError):
        await add(sessions, clash)
    # Many VMs without allocations: NULLs never clash.
    await add(sessions, vm("vm_nonet1"), vm("vm_nonet2"))


async def test_a_taken_subdomain_or_key_hash_is_an_integrity_error(sessions) -> None:
    await add(sessions, image(), vm("vm_a"))
    await add(sessions, route("rt_1", "vm_a", "taken", at(1)))
    with pytest.raises(IntegrityError):
        await add(sessions, route("rt_2", "vm_a", "taken", at(2)))
    await add(sessions, ApiKey(id="key_1", user_id="u", prefix="p", key_hash="x" * 64))
    with pytest.raises(IntegrityError):
        await add(sessions, ApiKey(id="key_2", user_id="u", prefix="p", key_hash="x" * 64))


async def test_concurrent_creates_racing_for_one_subdomain(sessions) -> None:
    await add(sessions, image(), vm("vm_a"))

    async def attempt(n: int) -> bool:
        try:
            await add(sessions, route(f"rt_{n}", "vm_a", "race", at(n)))
        except IntegrityError:
            return False
        return True

    results = await asyncio.gather(*(attempt(n) for n in range(5)))
    assert sorted(results) == [False] * 4 + [True]


async def test_allocation_race_is_retried(
    sessions, engine: AsyncEngine, tmp_path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Users creating networked VMs at once all read the same free address; the unique
    indexes refuse all but one insert and VMService picks again (core/vms.py _insert)."""
    await add(sessions, image())
    users = 4
    settings = load_settings(
        data_dir=tmp_path, bridge_cidr="172.16.9.1/24", ssh_port_min=20000, ssh_port_max=20099
    )
    vmm = SimpleNamespace(memory_footprint_mib=lambda mem_mib: mem_mib + 64)
    service = VMService(settings, sessions, vmm=vmm, network=None, consoles=None)  # type: ignore[arg-type]
    refused: list[str] = []

    @event.listens_for(engine.sync_engine, "handle_error")
    def _seen(context: Any) -> None:
        refused.append(type(context.sqlalchemy_exception).__name__)

    # Each user's first look at the used addresses waits until every user has looked, so all
    # of them pick the same first free address: a race, every time.
    real = repo.used_allocations
    looked = 0
    all_looked = asyncio.Event()

    async def used_allocations(session: Any) -> Any:
        nonlocal looked
        result = await real(session)
        if not all_looked.is_set():
            looked += 1
            if looked == users:
                all_looked.set()
            await asyncio.wait_for(all_looked.wait(), 30)
        return result

    monkeypatch.setattr(repo, "used_allocations", used_allocations)
    cfg = VMConfig(
        image_id="img_default",
        vcpu_count=1,
        mem_mib=256,
        enable_network=True,
        egress=Egress.INTERNET,
        user_data=None,
        boot_args=None,
    )
    made = await asyncio.gather(
        *(service._insert(f"vm_race{n:05d}", f"user{n}", cfg, None) for n in range(users))
    )
    assert len({v.guest_ip for v in made}) == users
    assert len({v.ssh_port for v in made}) == users
    assert len({v.guest_mac for v in made}) == users
    assert refused and set(refused) == {"IntegrityError"}, refused
    async with sessions() as s:
        assert len(await repo.list_vms(s)) == users


# ---- an unreachable database ----------------------------------------------------------------


@pytest.mark.vm  # starts hatchd, which belongs inside the suite's network namespace
def test_an_unreachable_postgresql_stops_hatchd_and_the_cli_with_one_line(
    postgres_server, tmp_path
) -> None:
    """Regression: both ended in a traceback (the CLI's showed the driver's error only)."""
    for url in (
        postgres_server.tcp_url("nosuchdb").replace("@", ":secret@", 1),
        "postgresql://hatch:secret@127.0.0.1:1/hatch",  # nothing listens there
    ):
        env = {
            **os.environ,
            "HATCH_DATABASE_URL": url,
            "HATCH_DATA_DIR": str(tmp_path / "data"),
            "HATCH_RUN_DIR": str(tmp_path / "run"),
            "HATCH_HTTP_ADDR": "127.0.0.1:1",  # never reached: the database comes first
        }
        for cmd, status, prefix in (
            ([sys.executable, "-m", "hatchvm.daemon"], 2, "hatchd: database unreachable"),
            ([sys.executable, "-m", "hatchvm.cli.main", "keys", "list"], 1, "error: database"),
        ):
            done = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=120)
            last = done.stderr.strip().splitlines()[-1]
            assert done.returncode == status and last.startswith(prefix), done.stderr[-3000:]
            assert "Traceback" not in done.stderr and "secret" not in done.stderr
            assert "HATCH_DATABASE_URL is postgresql+asyncpg://hatch:***@127.0.0.1:" in last
