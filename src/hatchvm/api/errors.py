"""Every failure becomes {"error": "..."} with the right status; nothing leaks a traceback."""

from __future__ import annotations

import structlog
from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException

from hatchvm.api.validation import describe_errors
from hatchvm.errors import HatchError

log = structlog.get_logger("hatchvm.api")


def error_response(status: int, message: str) -> JSONResponse:
    return JSONResponse({"error": message}, status_code=status)


def install_error_handlers(app: FastAPI) -> None:
    @app.exception_handler(HatchError)
    async def _hatch(request: Request, exc: HatchError) -> JSONResponse:
        if exc.status >= 500:
            log.error("request failed", path=request.url.path, status=exc.status, error=exc.message)
        return error_response(exc.status, exc.message)

    @app.exception_handler(RequestValidationError)
    async def _validation(request: Request, exc: RequestValidationError) -> JSONResponse:
        return error_response(400, describe_errors(exc.errors()))

    @app.exception_handler(HTTPException)
    async def _http(request: Request, exc: HTTPException) -> JSONResponse:
        message = str(exc.detail).lower() if exc.detail else "error"
        return error_response(exc.status_code, message)

    @app.exception_handler(Exception)
    async def _unexpected(request: Request, exc: Exception) -> JSONResponse:
        log.exception("unexpected error", path=request.url.path)
        return error_response(500, f"internal error: {type(exc).__name__}: {exc}")
