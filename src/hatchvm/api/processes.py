"""/vms/{id}/processes: the background processes started by exec, their output, signals."""

from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter, Path, Request

from hatchvm.api.deps import Svc, User
from hatchvm.api.openapi import AUTHENTICATED, GUEST, errors, json_body
from hatchvm.api.outputs import (
    Deleted,
    Process,
    ProcessOutput,
    render_process,
    render_process_output,
)
from hatchvm.api.schemas import SIGNALS, KillRequest
from hatchvm.api.validation import parse_body

router = APIRouter(tags=["exec"], responses=errors(*AUTHENTICATED, 500, *GUEST))

# A guest's pid (Linux's are below 2^22; the protocol carries 8-byte integers).
Pid = Annotated[int, Path(ge=1, le=2**31 - 1, description="the background process's pid")]


@router.get("/vms/{vm_id}/processes")
async def list_processes(vm_id: str, user: User, svc: Svc) -> list[Process]:
    return [render_process(p) for p in await svc.execs.processes(user, vm_id)]


@router.get("/vms/{vm_id}/processes/{pid}")
async def get_process(vm_id: str, pid: Pid, user: User, svc: Svc) -> ProcessOutput:
    return render_process_output(*await svc.execs.process(user, vm_id, pid))


@router.post(
    "/vms/{vm_id}/processes/{pid}/kill", openapi_extra=json_body(KillRequest, required=False)
)
async def kill_process(vm_id: str, pid: Pid, request: Request, user: User, svc: Svc) -> Process:
    body = await parse_body(request, KillRequest)
    process = await svc.execs.signal(user, vm_id, pid, SIGNALS[body.signal], forget=False)
    return render_process(process)


@router.delete("/vms/{vm_id}/processes/{pid}")
async def delete_process(vm_id: str, pid: Pid, user: User, svc: Svc) -> Deleted:
    """Killed (SIGKILL to its group) if it still runs, and forgotten with its output."""
    await svc.execs.signal(user, vm_id, pid, SIGNALS["KILL"], forget=True)
    return Deleted()
