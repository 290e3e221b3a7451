"""Request dependencies: the caller's user id and the services built by the daemon."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Annotated, Any

from fastapi import Depends, Request
from sqlalchemy.ext.asyncio import async_sessionmaker

from hatchvm.auth.base import Verifier, key_from_request
from hatchvm.config import Settings
from hatchvm.core.routes import RouteService
from hatchvm.core.snapshots import SnapshotService
from hatchvm.core.vms import VMService


@dataclass
class Services:
    """Everything the API needs, built explicitly by the daemon (no globals)."""

    settings: Settings
    sessions: async_sessionmaker[Any]
    verifier: Verifier
    vms: VMService
    snapshots: SnapshotService
    routes: RouteService


def services(request: Request) -> Services:
    return request.app.state.services  # type: ignore[no-any-return]


async def current_user(request: Request) -> str:
    return await services(request).verifier.verify(key_from_request(request))


User = Annotated[str, Depends(current_user)]
Svc = Annotated[Services, Depends(services)]
