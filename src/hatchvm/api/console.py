"""/vms/{id}/console: the tail of a guest's console, and its new output as it comes."""

from __future__ import annotations

from collections.abc import AsyncIterator

from fastapi import APIRouter, Query
from fastapi.responses import PlainTextResponse, StreamingResponse

from hatchvm.api.deps import Svc, User
from hatchvm.api.openapi import AUTHENTICATED, ERRORS, REF
from hatchvm.core.console import Consoles
from hatchvm.vmm.base import Feature

router = APIRouter(tags=["vms"])

# Errors stay JSON on a route whose answer is text: stated per status, not by model (FastAPI
# would give a model the route's text media type).
_JSON_ERRORS = {
    status: {
        "description": ERRORS[status],
        "content": {"application/json": {"schema": {"$ref": REF.format(model="Error")}}},
    }
    for status in (*AUTHENTICATED, 400, 404, 501)
}

TAIL_READ = 1 << 20  # the tail is cut from at most this much of the console


@router.get(
    "/vms/{vm_id}/console",
    response_model=None,
    response_class=PlainTextResponse,
    responses={
        200: {
            "description": "The console's last lines; with follow=true, then its new output "
            "as it comes, until the VM's VMM ends",
            "content": {"text/plain": {"schema": {"type": "string"}}},
        },
        **_JSON_ERRORS,
    },
)
async def get_console(
    vm_id: str,
    user: User,
    svc: Svc,
    lines: int = Query(default=100, ge=1, le=10_000),
    follow: bool = False,
) -> PlainTextResponse | StreamingResponse:
    await svc.vms.get(user, vm_id)  # 404 for a VM that is not the caller's
    await svc.vms.require(Feature.CONSOLE, vm_id)
    vm_dir = svc.vms.vm_dir(vm_id)
    new_output = svc.vms.consoles.follow(vm_id) if follow else None
    text = Consoles.tail(vm_dir, TAIL_READ).decode(errors="replace")
    tail = "".join(text.splitlines(keepends=True)[-lines:])
    if new_output is None:
        return PlainTextResponse(tail)

    async def stream() -> AsyncIterator[bytes]:
        yield tail.encode()
        async for chunk in new_output:
            yield chunk

    return StreamingResponse(stream(), media_type="text/plain; charset=utf-8")
