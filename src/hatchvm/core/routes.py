"""Routes: which subdomain reaches which VM port. The proxy looks them up on every request,
so lookups are served from memory, refreshed whenever a route is created or deleted."""

from __future__ import annotations

from datetime import UTC, datetime

import structlog
from sqlalchemy.exc import IntegrityError

from hatchvm.config import Settings
from hatchvm.core.subdomains import random_subdomain
from hatchvm.core.vms import VMService
from hatchvm.db import repo
from hatchvm.db.models import VM, Route
from hatchvm.errors import Conflict, InternalError, NotFound
from hatchvm.ids import new_id

log = structlog.get_logger("hatchvm.core")

_RANDOM_ATTEMPTS = 5


class RouteService:
    def __init__(self, settings: Settings, vms: VMService) -> None:
        self._s = settings
        self.vms = vms
        self._by_subdomain: dict[str, Route] = {}
        vms.delete_hooks.append(self._forget_vm)

    def url(self, route: Route) -> str:
        _host, port = self._s.proxy_host_port
        suffix = "" if port == 80 else f":{port}"
        return f"http://{route.subdomain}.{self._s.proxy_base_domain}{suffix}"

    async def load(self) -> None:
        """Fill the lookup table from the database (at start-up)."""
        async with self.vms.sessions() as session:
            routes = await repo.all_routes(session)
        self._by_subdomain = {r.subdomain: r for r in routes}

    def wakes(self, vm_id: str) -> bool:
        """Whether the VM has a route that wakes it (only those VMs may be put to sleep)."""
        return any(r.vm_id == vm_id and r.auto_wake for r in self._by_subdomain.values())

    def lookup(self, subdomain: str) -> Route | None:
        return self._by_subdomain.get(subdomain)

    async def create(
        self,
        user_id: str,
        vm_id: str,
        subdomain: str | None,
        target_port: int,
        auto_wake: bool,
    ) -> Route:
        vm = await self.vms.get(user_id, vm_id)
        if not vm.enable_network:
            raise Conflict(f"vm {vm_id} has no network (enable_network is false)")
        attempts = 1 if subdomain is not None else _RANDOM_ATTEMPTS
        for _ in range(attempts):
            name = subdomain or random_subdomain()
            now = datetime.now(UTC)
            route = Route(
                id=new_id("rt"),
                vm_id=vm.id,
                user_id=user_id,
                subdomain=name,
                target_port=target_port,
                auto_wake=auto_wake,
                created_at=now,
                updated_at=now,
            )
            try:
                async with self.vms.sessions() as session, session.begin():
                    session.add(route)
            except IntegrityError:
                # The unique index decides races: two requests for one name, one wins.
                if subdomain is not None:
                    raise Conflict(f"subdomain {name} is already in use") from None
                continue
            self._by_subdomain[name] = route
            # An API operation on the VM: the reaper must not freeze a VM the moment it gets
            # its first waking route just because it was quiet before.
            await self.vms.touch_activity(vm.id)
            log.info("route created", route_id=route.id, vm_id=vm.id, subdomain=name)
            return route
        raise InternalError("could not find a free random subdomain; try again")

    async def list(self, user_id: str, vm_id: str) -> list[Route]:
        await self.vms.get(user_id, vm_id)
        async with self.vms.sessions() as session:
            return await repo.list_routes(session, vm_id)

    async def delete(self, user_id: str, route_id: str) -> None:
        async with self.vms.sessions() as session, session.begin():
            route = await repo.get_route(session, route_id)
            if route is None or route.user_id != user_id:
                raise NotFound(f"route {route_id} not found")
            await session.delete(route)
        self._by_subdomain.pop(route.subdomain, None)
        log.info("route deleted", route_id=route_id, subdomain=route.subdomain)

    async def _forget_vm(self, vm: VM) -> None:
        """Delete hook of VMService: the VM's routes go with it."""
        async with self.vms.sessions() as session, session.begin():
            for route in await repo.list_routes(session, vm.id):
                await session.delete(route)
                self._by_subdomain.pop(route.subdomain, None)
