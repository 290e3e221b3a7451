"""Every failure becomes {"error": "..."} with the right status; nothing leaks a traceback."""

from __future__ import annotations

from collections.abc import Mapping

import structlog
from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException
from starlette.routing import Match

from hatchvm.api.validation import describe_errors
from hatchvm.errors import HatchError
from hatchvm.images.errors import ImageError, UserDataError
from hatchvm.net.errors import NetworkError
from hatchvm.vmm.base import VMMError, VMMUnsupported

log = structlog.get_logger("hatchvm.api")

_METHODS = ("DELETE", "GET", "HEAD", "OPTIONS", "PATCH", "POST", "PUT")


def error_response(
    status: int, message: str, headers: Mapping[str, str] | None = None
) -> JSONResponse:
    return JSONResponse({"error": message}, status_code=status, headers=headers)


def allowed_methods(request: Request) -> str:
    """Every method some route serves on this path. Starlette's own Allow names only the first
    route that matched the path (GET /vms, not POST /vms)."""
    allowed = []
    for method in _METHODS:
        scope = {**request.scope, "method": method}
        if any(route.matches(scope)[0] == Match.FULL for route in request.app.router.routes):
            allowed.append(method)
    return ", ".join(allowed)


def install_error_handlers(app: FastAPI) -> None:
    @app.exception_handler(HatchError)
    async def _hatch(request: Request, exc: HatchError) -> JSONResponse:
        if exc.status >= 500:
            log.error("request failed", path=request.url.path, status=exc.status, error=exc.message)
        return error_response(exc.status, exc.message)

    @app.exception_handler(VMMError)
    async def _vmm(request: Request, exc: VMMError) -> JSONResponse:
        status = 501 if isinstance(exc, VMMUnsupported) else 500
        if status == 500:
            log.error(
                "vmm failed", path=request.url.path, vm_id=exc.vm_id, op=exc.op, error=str(exc)
            )
        return error_response(status, exc.message)

    @app.exception_handler(ImageError)
    async def _image(request: Request, exc: ImageError) -> JSONResponse:
        if isinstance(exc, UserDataError):
            return error_response(400, exc.message)
        log.error("image or disk failed", path=request.url.path, error=exc.message)
        return error_response(500, exc.message)

    @app.exception_handler(NetworkError)
    async def _network(request: Request, exc: NetworkError) -> JSONResponse:
        log.error("host network failed", path=request.url.path, error=exc.message)
        return error_response(500, exc.message)

    @app.exception_handler(RequestValidationError)
    async def _validation(request: Request, exc: RequestValidationError) -> JSONResponse:
        return error_response(400, describe_errors(exc.errors()))

    @app.exception_handler(HTTPException)
    async def _http(request: Request, exc: HTTPException) -> JSONResponse:
        message = str(exc.detail).lower() if exc.detail else "error"
        headers = dict(exc.headers or {})
        if exc.status_code == 405:
            headers["Allow"] = allowed_methods(request)
        return error_response(exc.status_code, message, headers)

    @app.exception_handler(Exception)
    async def _unexpected(request: Request, exc: Exception) -> JSONResponse:
        log.exception("unexpected error", path=request.url.path)
        return error_response(500, f"internal error: {type(exc).__name__}: {exc}")
