"""Snapshots: take, restore, list, show, delete."""

from __future__ import annotations

from fastapi import APIRouter, Request

from hatchvm.api.deps import Svc, User
from hatchvm.api.openapi import AUTHENTICATED, SNAPSHOT_ID, VM_LINKS, errors, json_body, links
from hatchvm.api.outputs import VM, Deleted, Snapshot, render_snapshot, render_vm
from hatchvm.api.schemas import RestoreRequest
from hatchvm.api.validation import parse_body

router = APIRouter(tags=["snapshots"], responses=errors(*AUTHENTICATED))


# A snapshot's answer leads to itself and back to its VM (restore it from this snapshot).
SNAPSHOT_LINKS = links(
    201,
    get_snapshot=SNAPSHOT_ID,
    delete_snapshot=SNAPSHOT_ID,
    restore_vm={
        "vm_id": "$response.body#/vm_id",
        "requestBody": {"snapshot_id": "$response.body#/id"},
    },
    list_snapshots={"vm_id": "$response.body#/vm_id"},
)


@router.post(
    "/vms/{vm_id}/snapshot",
    status_code=201,
    responses={**errors(403, 404, 409, 500, 501), **SNAPSHOT_LINKS},
)
async def snapshot_vm(vm_id: str, user: User, svc: Svc) -> Snapshot:
    return render_snapshot(await svc.snapshots.snapshot(user, vm_id))


@router.post(
    "/vms/{vm_id}/restore",
    responses={**errors(400, 404, 409, 500, 501), **links(200, **VM_LINKS)},
    openapi_extra=json_body(RestoreRequest, required=False),
)
async def restore_vm(vm_id: str, request: Request, user: User, svc: Svc) -> VM:
    body = await parse_body(request, RestoreRequest)
    return render_vm(await svc.snapshots.restore(user, vm_id, body.snapshot_id))


@router.get("/vms/{vm_id}/snapshots", responses=errors(404))
async def list_snapshots(vm_id: str, user: User, svc: Svc) -> list[Snapshot]:
    return [render_snapshot(s) for s in await svc.snapshots.list(user, vm_id)]


@router.get("/snapshots/{snapshot_id}", responses=errors(404))
async def get_snapshot(snapshot_id: str, user: User, svc: Svc) -> Snapshot:
    return render_snapshot(await svc.snapshots.get(user, snapshot_id))


@router.delete("/snapshots/{snapshot_id}", responses=errors(404, 409))
async def delete_snapshot(snapshot_id: str, user: User, svc: Svc) -> Deleted:
    await svc.snapshots.delete(user, snapshot_id)
    return Deleted()
