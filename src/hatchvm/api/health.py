"""/healthz: liveness plus what a operator wants to see at a glance (no auth)."""

from __future__ import annotations

from fastapi import APIRouter
from sqlalchemy import text

from hatchvm.api.deps import Svc
from hatchvm.api.openapi import errors
from hatchvm.api.outputs import Health

router = APIRouter(tags=["health"])


@router.get("/healthz", responses=errors(413, 500))
async def healthz(svc: Svc) -> Health:
    async with svc.sessions() as session:
        await session.execute(text("SELECT 1"))
    caps = await svc.vms.vmm.capabilities()
    return Health(
        status="ok", vmm=caps.name, accel=caps.accel, database="ok", auth=svc.verifier.name
    )
