"""Request bodies: strict JSON objects, unknown fields refused, errors that name the field."""

from __future__ import annotations

import json
from collections.abc import Sequence
from typing import Any, TypeVar

from fastapi import Request
from pydantic import BaseModel, ValidationError

from hatchvm.errors import BadRequest

M = TypeVar("M", bound=BaseModel)


def _field(loc: Sequence[Any]) -> str:
    parts = [str(p) for p in loc if p != "body"]
    return ".".join(parts) or "body"


def describe_errors(errors: Sequence[Any]) -> str:
    """Pydantic's error list -> 'vcpu_count: must be <= 32; foo: unknown field'."""
    lines = []
    for err in errors:
        field = _field(err.get("loc", ()))
        kind = err.get("type", "")
        if kind == "extra_forbidden":
            msg = "unknown field"
        elif kind == "missing":
            msg = "field required"
        elif kind == "json_invalid":
            return "invalid JSON body"
        elif kind == "value_error" and "error" in (err.get("ctx") or {}):
            msg = str(err["ctx"]["error"])  # our own validator's words, without "Value error, "
        else:
            msg = str(err.get("msg", "invalid value"))
            msg = msg[0].lower() + msg[1:] if msg else "invalid value"
        lines.append(f"{field}: {msg}")
    return "; ".join(lines) or "invalid request"


async def parse_body(request: Request, model: type[M]) -> M:
    """An empty body means {}; anything else must be one JSON object matching model.
    Its size is bounded before it gets here (api/body_limit.py)."""
    raw = await request.body()
    if not raw.strip():
        data: Any = {}
    else:
        try:
            data = json.loads(raw)
        # ValueError: bad syntax or encoding, and integers past Python's 4300-digit limit.
        except ValueError as exc:
            raise BadRequest(f"invalid JSON body: {exc}") from None
        except RecursionError:
            raise BadRequest("invalid JSON body: nested too deeply") from None
    if not isinstance(data, dict):
        raise BadRequest("body must be a JSON object")
    try:
        return model.model_validate(data)
    except ValidationError as exc:
        raise BadRequest(describe_errors(exc.errors())) from None
