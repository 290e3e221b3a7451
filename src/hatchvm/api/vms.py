"""/vms: create, list, show, stop, start, delete."""

from __future__ import annotations

from typing import Any

from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse

from hatchvm.api.deps import Svc, User
from hatchvm.api.schemas import VMCreate, render_vm
from hatchvm.api.validation import parse_body
from hatchvm.core.vms import VMConfig

router = APIRouter(prefix="/vms")


@router.post("", status_code=201)
async def create_vm(request: Request, user: User, svc: Svc) -> JSONResponse:
    body = await parse_body(request, VMCreate)
    cfg = VMConfig(
        image_id=body.image_id,
        vcpu_count=body.vcpu_count or svc.settings.default_vcpu,
        mem_mib=body.mem_mib or svc.settings.default_mem_mib,
        enable_network=body.enable_network,
        egress=body.egress_or_default,
        user_data=body.user_data,
        boot_args=body.boot_args,
        restart=body.restart,
    )
    vm = await svc.vms.create(user, cfg)
    return JSONResponse(render_vm(vm), status_code=201)


@router.get("")
async def list_vms(user: User, svc: Svc) -> list[dict[str, Any]]:
    return [render_vm(vm) for vm in await svc.vms.list(user)]


@router.get("/{vm_id}")
async def get_vm(vm_id: str, user: User, svc: Svc) -> dict[str, Any]:
    return render_vm(await svc.vms.get(user, vm_id))


@router.post("/{vm_id}/stop")
async def stop_vm(vm_id: str, user: User, svc: Svc) -> dict[str, Any]:
    return render_vm(await svc.vms.stop(user, vm_id))


@router.post("/{vm_id}/start")
async def start_vm(vm_id: str, user: User, svc: Svc) -> dict[str, Any]:
    return render_vm(await svc.vms.start(user, vm_id))


@router.delete("/{vm_id}")
async def delete_vm(vm_id: str, user: User, svc: Svc) -> dict[str, str]:
    await svc.vms.delete(user, vm_id)
    return {"status": "deleted"}
