"""Run Alembic migrations programmatically (the daemon and the CLI call this at start)."""

from __future__ import annotations

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


async def upgrade(engine: AsyncEngine, target: str = "head") -> None:
    """Bring the schema to the target revision (the newest by default) on an async engine."""
    await _reach(engine)
    cfg = _config()

    def run(sync_conn: Connection) -> None:
        _lock(sync_conn)
        cfg.attributes["connection"] = sync_conn
        command.upgrade(cfg, target)

    async with engine.begin() as conn:
        await conn.run_sync(run)
