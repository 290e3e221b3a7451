"""Local administration run by the CLI on the daemon's host: API keys and image builds.

These touch the database and data directory directly (they bootstrap access, so they cannot
go through the authenticated API).
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass
from datetime import datetime
from typing import Any

from sqlalchemy.ext.asyncio import async_sessionmaker

from hatchvm.api.outputs import render_image
from hatchvm.auth import local
from hatchvm.config import Settings
from hatchvm.db import repo
from hatchvm.db.engine import make_engine, make_sessionmaker
from hatchvm.db.migrate import upgrade
from hatchvm.db.models import ApiKey
from hatchvm.errors import BadRequest
from hatchvm.ids import DEFAULT_IMAGE_ID
from hatchvm.images import builder, registry
from hatchvm.private import make_private_dir


@dataclass(frozen=True)
class KeyInfo:
    id: str
    user_id: str
    prefix: str  # first characters of the key, enough to recognise it
    created_at: datetime
    revoked_at: datetime | None


def _info(row: ApiKey) -> KeyInfo:
    return KeyInfo(row.id, row.user_id, row.prefix, row.created_at, row.revoked_at)


@asynccontextmanager
async def _database(settings: Settings) -> AsyncIterator[async_sessionmaker[Any]]:
    make_private_dir(settings.data_dir)
    engine = make_engine(settings.sqlalchemy_url)
    try:
        await upgrade(engine)
        yield make_sessionmaker(engine)
    finally:
        await engine.dispose()


async def create_key(settings: Settings, user_id: str) -> tuple[KeyInfo, str]:
    """Create a key for user_id; return its info and the full key (shown once)."""
    user_id = user_id.strip()
    if not user_id or len(user_id) > 128:
        raise BadRequest("user: must be 1-128 characters")
    async with _database(settings) as sessions:
        row, key = await local.create_key(sessions, user_id)
    return _info(row), key


async def list_keys(settings: Settings) -> list[KeyInfo]:
    async with _database(settings) as sessions, sessions() as session:
        return [_info(row) for row in await repo.list_keys(session)]


async def revoke_key(settings: Settings, key_id: str) -> KeyInfo:
    """Raises hatchvm.errors.NotFound for an unknown id."""
    async with _database(settings) as sessions:
        return _info(await local.revoke_key(sessions, key_id))


async def build_image(
    settings: Settings, progress: Callable[[str], None], force: bool = False
) -> dict[str, object]:
    """Build (or, unless force, reuse) img_default and register it; returns the image object."""
    out_dir = registry.default_image_dir(settings)
    artifacts = None if force else await asyncio.to_thread(builder.current_artifacts, out_dir)
    if artifacts is None or not artifacts.up_to_date:
        artifacts = await asyncio.to_thread(
            builder.build_default_image, out_dir, settings.cache_dir / "debs", progress
        )
    else:
        progress(f"img_default {artifacts.version} is already built (use --force to rebuild)")
    async with _database(settings) as sessions:
        image = await registry.register(sessions, DEFAULT_IMAGE_ID, artifacts)
    return render_image(image).model_dump(mode="json")
