"""Routes: create and list a VM's routes, delete one."""

from __future__ import annotations

from typing import Any

from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse

from hatchvm.api.deps import Svc, User
from hatchvm.api.schemas import RouteCreate, render_route
from hatchvm.api.validation import parse_body

router = APIRouter()


@router.post("/vms/{vm_id}/routes", status_code=201)
async def create_route(vm_id: str, request: Request, user: User, svc: Svc) -> JSONResponse:
    body = await parse_body(request, RouteCreate)
    route = await svc.routes.create(user, vm_id, body.subdomain, body.target_port, body.auto_wake)
    return JSONResponse(render_route(route, svc.routes.url(route)), status_code=201)


@router.get("/vms/{vm_id}/routes")
async def list_routes(vm_id: str, user: User, svc: Svc) -> list[dict[str, Any]]:
    return [render_route(r, svc.routes.url(r)) for r in await svc.routes.list(user, vm_id)]


@router.delete("/routes/{route_id}")
async def delete_route(route_id: str, user: User, svc: Svc) -> dict[str, str]:
    await svc.routes.delete(user, route_id)
    return {"status": "deleted"}
