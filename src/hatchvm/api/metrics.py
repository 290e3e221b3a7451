"""GET /metrics: Prometheus's text format, no API key. Served by the API's app unless
HATCH_METRICS_ADDR gives it a listener of its own (metrics_app below); then the API's answers
404 here."""

from __future__ import annotations

from fastapi import APIRouter, FastAPI, Request, Response

from hatchvm.api.errors import install_error_handlers
from hatchvm.api.openapi import errors
from hatchvm.api.outputs import Error
from hatchvm.errors import NotFound
from hatchvm.metrics.scrape import CONTENT_TYPE, Scrape

router = APIRouter(tags=["metrics"])

TEXT = CONTENT_TYPE.removesuffix("; charset=utf-8")  # as the OpenAPI document names it


@router.get(
    "/metrics",
    response_class=Response,
    responses={
        200: {
            "description": "Prometheus text exposition format 0.0.4 (the README's Metrics "
            "section lists the figures)",
            "content": {TEXT: {"schema": {"type": "string"}}},
        },
        404: {"model": Error, "description": "HATCH_METRICS_ADDR serves them elsewhere"},
        **errors(413),
    },
)
async def get_metrics(request: Request) -> Response:
    """hatchd's figures for Prometheus: wakes, snapshots, restores, VMs by state, proxied
    requests, agent syncs, VM deaths, SSH gateway connections."""
    scrape: Scrape | None = getattr(request.app.state, "metrics", None)
    if scrape is None:
        raise NotFound("metrics are not served on this address (see HATCH_METRICS_ADDR)")
    return Response(await scrape.render(), media_type=CONTENT_TYPE)


def metrics_app(scrape: Scrape) -> FastAPI:
    """The app of the metrics listener: /metrics alone, errors as JSON like the API's."""
    app = FastAPI(title="hatchvm metrics", docs_url=None, redoc_url=None, openapi_url=None)
    app.state.metrics = scrape
    install_error_handlers(app)
    app.include_router(router)
    return app
