"""Run Alembic migrations programmatically (the daemon and the CLI call this at start)."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

from alembic import command
from alembic.config import Config
from sqlalchemy import Connection
from sqlalchemy.exc import DBAPIError
from sqlalchemy.ext.asyncio import AsyncEngine

from hatchvm.errors import BackendUnavailable

MIGRATIONS = Path(__file__).parent / "migrations"

# Key of the PostgreSQL advisory lock held while migrating ("hatc").
_PG_LOCK_KEY = 0x68617463


class DatabaseUnreachable(BackendUnavailable):
    """The database named by HATCH_DATABASE_URL cannot be reached; the message says why."""


def _config() -> Config:
    cfg = Config()
    cfg.set_main_option("script_location", str(MIGRATIONS))
    return cfg


def _lock(conn: Connection) -> None:
    """Hold the database's write lock until the migration commits.

    hatchd and each `hatchvm keys ...` migrate at start, so two processes may meet on a new
    database; without the lock both read "no version" and both create the tables."""
    if conn.dialect.name == "postgresql":
        conn.exec_driver_sql(f"SELECT pg_advisory_xact_lock({_PG_LOCK_KEY})")
    elif conn.dialect.name == "sqlite":
        # The driver has not begun a transaction yet (it waits for the first write); begin one
        # that takes the write lock now. Waiters wait up to the busy timeout (engine.py).
        conn.exec_driver_sql("BEGIN IMMEDIATE")


async def _reach(engine: AsyncEngine) -> None:
    try:
        async with engine.connect():
            pass
    except (OSError, DBAPIError) as exc:  # refused, unknown host, no such database, password...
        # SQLAlchemy's wrapper adds the SQL and a link: the driver's own words are enough.
        reason = str(getattr(exc, "orig", None) or exc).splitlines()[0]
        url = engine.url.render_as_string(hide_password=True)
        raise DatabaseUnreachable(
            f"database unreachable (HATCH_DATABASE_URL is {url}): {reason}"
        ) from None


async def _migrate(engine: AsyncEngine, step: Callable[[Config, str], None], target: str) -> None:
    await _reach(engine)
    cfg = _config()

    def run(sync_conn: Connection) -> None:
        _lock(sync_conn)
        cfg.attributes["connection"] = sync_conn
        step(cfg, target)
        if sync_conn.dialect.name == "sqlite":
            broken = sync_conn.exec_driver_sql("PRAGMA foreign_key_check").fetchall()
            if broken:  # raised inside the transaction: nothing of the migration is kept
                raise RuntimeError(f"migration to {target} broke foreign keys: {broken[:5]}")

    async with engine.connect() as conn:
        sqlite = conn.dialect.name == "sqlite"
        if sqlite:
            # A batch migration rebuilds a SQLite table (copy, drop, rename); with foreign keys
            # on, dropping vms deletes every snapshot and route through ON DELETE CASCADE. The
            # pragma cannot change inside a transaction, so: off, migrate, check, on again.
            await conn.exec_driver_sql("PRAGMA foreign_keys=OFF")
            await conn.commit()
        try:
            async with conn.begin():
                await conn.run_sync(run)
        finally:
            if sqlite:
                await conn.exec_driver_sql("PRAGMA foreign_keys=ON")
                await conn.commit()


async def upgrade(engine: AsyncEngine, target: str = "head") -> None:
    """Bring the schema to the target revision (the newest by default) on an async engine."""
    await _migrate(engine, command.upgrade, target)


async def downgrade(engine: AsyncEngine, target: str) -> None:
    """Take the schema back to an older revision ("base": no tables), keeping the rows."""
    await _migrate(engine, command.downgrade, target)
