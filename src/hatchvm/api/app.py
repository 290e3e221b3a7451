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
from hatchvm.api.metrics import router as metrics_router
from hatchvm.metrics.scrape import Scrape


def create_app(services: Services, scrape: Scrape | None = None) -> FastAPI:
    """scrape: serve GET /metrics here (None: 404, as when HATCH_METRICS_ADDR is set)."""
    app = FastAPI(
        title="hatchvm",
        docs_url=None,
        redoc_url=None,
        openapi_url="/openapi.json",
        generate_unique_id_function=openapi.operation_id,
    )
    app.state.services = services
    app.state.metrics = scrape
    install_error_handlers(app)
    app.add_middleware(BodyLimit)
    for module in (health, vms, snapshots, forks, routes, images, console, exec, processes, files):
        app.include_router(module.router)
    app.include_router(metrics_router)
    openapi.install(app)
    return app
