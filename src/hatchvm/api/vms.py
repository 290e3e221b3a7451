"""/vms: create, list, show, stop, start, delete."""

from __future__ import annotations

from fastapi import APIRouter, Request

from hatchvm.api.deps import Svc, User
from hatchvm.api.openapi import AUTHENTICATED, VM_LINKS, errors, json_body, links
from hatchvm.api.outputs import VM, Deleted, render_vm
from hatchvm.api.schemas import VMCreate
from hatchvm.api.validation import parse_body
from hatchvm.core.vms import VMConfig

router = APIRouter(prefix="/vms", tags=["vms"], responses=errors(*AUTHENTICATED))


@router.post(
    "",
    status_code=201,
    responses={**errors(400, 403, 500), **links(201, **VM_LINKS)},
    openapi_extra=json_body(VMCreate, required=False),
)
async def create_vm(request: Request, user: User, svc: Svc) -> VM:
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
    return render_vm(await svc.vms.create(user, cfg))


@router.get("")
async def list_vms(user: User, svc: Svc) -> list[VM]:
    return [render_vm(vm) for vm in await svc.vms.list(user)]


@router.get("/{vm_id}", responses=errors(404))
async def get_vm(vm_id: str, user: User, svc: Svc) -> VM:
    return render_vm(await svc.vms.get(user, vm_id))


@router.post("/{vm_id}/stop", responses={**errors(404, 409, 500), **links(200, **VM_LINKS)})
async def stop_vm(vm_id: str, user: User, svc: Svc) -> VM:
    return render_vm(await svc.vms.stop(user, vm_id))


@router.post("/{vm_id}/start", responses={**errors(404, 409, 500), **links(200, **VM_LINKS)})
async def start_vm(vm_id: str, user: User, svc: Svc) -> VM:
    return render_vm(await svc.vms.start(user, vm_id))


@router.delete("/{vm_id}", responses=errors(404, 500))
async def delete_vm(vm_id: str, user: User, svc: Svc) -> Deleted:
    await svc.vms.delete(user, vm_id)
    return Deleted()
