"""The FastAPI application: routers, error handlers, no docs pages on the public port."""

from __future__ import annotations

from fastapi import FastAPI

from hatchvm.api import (
    console,
    exec,
    files,
    forks,
    health,
    images,
    openapi,
    processes,
    routes,
    snapshots,
    vms,
)
from hatchvm.api.body_limit import BodyLimit
from hatchvm.api.deps import Services
from hatchvm.api.errors import install_error_handlers


def create_app(services: Services) -> FastAPI:
    app = FastAPI(
        title="hatchvm",
        docs_url=None,
        redoc_url=None,
        openapi_url="/openapi.json",
        generate_unique_id_function=openapi.operation_id,
    )
    app.state.services = services
    install_error_handlers(app)
    app.add_middleware(BodyLimit)
    for module in (health, vms, snapshots, forks, routes, images, console, exec, processes, files):
        app.include_router(module.router)
    openapi.install(app)
    return app
