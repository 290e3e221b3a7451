"""Snapshots: take, restore, list, show, delete."""

from __future__ import annotations

from typing import Any

from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse

from hatchvm.api.deps import Svc, User
from hatchvm.api.schemas import RestoreRequest, render_snapshot, render_vm
from hatchvm.api.validation import parse_body

router = APIRouter()


@router.post("/vms/{vm_id}/snapshot", status_code=201)
async def snapshot_vm(vm_id: str, user: User, svc: Svc) -> JSONResponse:
    snap = await svc.snapshots.snapshot(user, vm_id)
    return JSONResponse(render_snapshot(snap), status_code=201)


@router.post("/vms/{vm_id}/restore")
async def restore_vm(vm_id: str, request: Request, user: User, svc: Svc) -> dict[str, Any]:
    body = await parse_body(request, RestoreRequest)
    return render_vm(await svc.snapshots.restore(user, vm_id, body.snapshot_id))


@router.get("/vms/{vm_id}/snapshots")
async def list_snapshots(vm_id: str, user: User, svc: Svc) -> list[dict[str, Any]]:
    return [render_snapshot(s) for s in await svc.snapshots.list(user, vm_id)]


@router.get("/snapshots/{snapshot_id}")
async def get_snapshot(snapshot_id: str, user: User, svc: Svc) -> dict[str, Any]:
    return render_snapshot(await svc.snapshots.get(user, snapshot_id))


@router.delete("/snapshots/{snapshot_id}")
async def delete_snapshot(snapshot_id: str, user: User, svc: Svc) -> dict[str, str]:
    await svc.snapshots.delete(user, snapshot_id)
    return {"status": "deleted"}
