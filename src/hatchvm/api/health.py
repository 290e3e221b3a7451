"""/healthz: liveness plus what a operator wants to see at a glance (no auth)."""

from __future__ import annotations

from typing import Any

from fastapi import APIRouter
from sqlalchemy import text

from hatchvm.api.deps import Svc

router = APIRouter()


@router.get("/healthz")
async def healthz(svc: Svc) -> dict[str, Any]:
    async with svc.sessions() as session:
        await session.execute(text("SELECT 1"))
    caps = await svc.vms.vmm.capabilities()
    return {
        "status": "ok",
        "vmm": caps.name,
        "accel": caps.accel,
        "database": "ok",
        "auth": svc.verifier.name,
    }
