"""Request dependencies: the caller's user id and the services built by the daemon."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Annotated, Any

from fastapi import Depends, Request, Security
from fastapi.security import APIKeyHeader, HTTPAuthorizationCredentials, HTTPBearer
from sqlalchemy.ext.asyncio import async_sessionmaker

from hatchvm.auth.base import Verifier, key_from_request
from hatchvm.config import Settings
from hatchvm.core.execs import ExecService
from hatchvm.core.files import FileService
from hatchvm.core.forks import ForkService
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
    execs: ExecService
    files: FileService
    forks: ForkService


def services(request: Request) -> Services:
    return request.app.state.services  # type: ignore[no-any-return]


# The two ways to pass a key, declared for the OpenAPI document only (auto_error off: they
# never answer); key_from_request reads the key and words the 401.
_bearer = HTTPBearer(
    scheme_name="bearer", auto_error=False, description="Authorization: Bearer <key>"
)
_api_key = APIKeyHeader(name="X-API-Key", scheme_name="apiKey", auto_error=False)


async def current_user(
    request: Request,
    _bearer_key: Annotated[HTTPAuthorizationCredentials | None, Security(_bearer)],
    _header_key: Annotated[str | None, Security(_api_key)],
) -> str:
    return await services(request).verifier.verify(key_from_request(request))


User = Annotated[str, Depends(current_user)]
Svc = Annotated[Services, Depends(services)]
