"""Routes: create and list a VM's routes, delete one."""

from __future__ import annotations

from fastapi import APIRouter, Request

from hatchvm.api.deps import Svc, User
from hatchvm.api.openapi import AUTHENTICATED, ROUTE_ID, errors, json_body, links
from hatchvm.api.outputs import Deleted, Route, render_route
from hatchvm.api.schemas import RouteCreate
from hatchvm.api.validation import parse_body

router = APIRouter(tags=["routes"], responses=errors(*AUTHENTICATED))


@router.post(
    "/vms/{vm_id}/routes",
    status_code=201,
    responses={
        **errors(400, 404, 409, 500),
        **links(201, delete_route=ROUTE_ID, list_routes={"vm_id": "$response.body#/vm_id"}),
    },
    openapi_extra=json_body(RouteCreate, required=True),
)
async def create_route(vm_id: str, request: Request, user: User, svc: Svc) -> Route:
    body = await parse_body(request, RouteCreate)
    route = await svc.routes.create(user, vm_id, body.subdomain, body.target_port, body.auto_wake)
    return render_route(route, svc.routes.url(route))


@router.get("/vms/{vm_id}/routes", responses=errors(404))
async def list_routes(vm_id: str, user: User, svc: Svc) -> list[Route]:
    return [render_route(r, svc.routes.url(r)) for r in await svc.routes.list(user, vm_id)]


@router.delete("/routes/{route_id}", responses=errors(404))
async def delete_route(route_id: str, user: User, svc: Svc) -> Deleted:
    await svc.routes.delete(user, route_id)
    return Deleted()
