"""Local API keys: `hatch_` + 32 random characters; only a SHA-256 hash is stored.

The keys are long random secrets, so a fast hash is enough (no dictionary to attack)."""

from __future__ import annotations

import hashlib
from datetime import UTC, datetime
from typing import Any

from sqlalchemy.ext.asyncio import async_sessionmaker

from hatchvm.db import repo
from hatchvm.db.models import ApiKey
from hatchvm.errors import NotFound, Unauthorized
from hatchvm.ids import new_id, random_token

KEY_PREFIX = "hatch_"


def hash_key(key: str) -> str:
    return hashlib.sha256(key.encode()).hexdigest()


class LocalKeyVerifier:
    name = "local"

    def __init__(self, sessions: async_sessionmaker[Any]) -> None:
        self._sessions = sessions

    async def close(self) -> None:
        pass

    async def verify(self, key: str) -> str:
        async with self._sessions() as session:
            row = await repo.key_by_hash(session, hash_key(key))
        if row is None or row.revoked_at is not None:
            raise Unauthorized("invalid API key")
        return row.user_id


async def create_key(sessions: async_sessionmaker[Any], user_id: str) -> tuple[ApiKey, str]:
    key = KEY_PREFIX + random_token(32)
    row = ApiKey(id=new_id("key"), user_id=user_id, prefix=key[:10], key_hash=hash_key(key))
    async with sessions() as session, session.begin():
        session.add(row)
    return row, key


async def revoke_key(sessions: async_sessionmaker[Any], key_id: str) -> ApiKey:
    async with sessions() as session, session.begin():
        row = await session.get(ApiKey, key_id)
        if row is None:
            raise NotFound(f"key {key_id} not found")
        if row.revoked_at is None:
            row.revoked_at = datetime.now(UTC)
    return row
