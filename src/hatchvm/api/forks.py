"""Forks: new VMs from a running or snapshotted VM, or from a stored snapshot."""

from __future__ import annotations

from fastapi import APIRouter, Request

from hatchvm.api.deps import Svc, User
from hatchvm.api.openapi import AUTHENTICATED, errors, json_body
from hatchvm.api.outputs import VM, render_vm
from hatchvm.api.schemas import ForkRequest
from hatchvm.api.validation import parse_body

router = APIRouter(tags=["forks"], responses=errors(*AUTHENTICATED))

# 400 count out of range, 403 the caller's quotas, 404 not the caller's, 409 the VM's state
# or an image without the agent, 501 a driver that cannot fork, 503 no room on the host.
_ERRORS = errors(400, 403, 404, 409, 500, 501, 503)


@router.post(
    "/vms/{vm_id}/fork",
    status_code=201,
    responses=_ERRORS,
    openapi_extra=json_body(ForkRequest, required=False),
)
async def fork_vm(vm_id: str, request: Request, user: User, svc: Svc) -> list[VM]:
    """New VMs running from this one's memory and disk as they are now (a running VM is
    paused only while it is captured) or as its latest snapshot holds them."""
    body = await parse_body(request, ForkRequest)
    return [render_vm(vm) for vm in await svc.forks.fork_vm(user, vm_id, body.count)]


@router.post(
    "/snapshots/{snapshot_id}/fork",
    status_code=201,
    responses=_ERRORS,
    openapi_extra=json_body(ForkRequest, required=False),
)
async def fork_snapshot(snapshot_id: str, request: Request, user: User, svc: Svc) -> list[VM]:
    """New VMs running from the snapshot's memory and disk."""
    body = await parse_body(request, ForkRequest)
    return [render_vm(vm) for vm in await svc.forks.fork_snapshot(user, snapshot_id, body.count)]
