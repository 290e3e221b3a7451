"""/openapi.json, made to tell the truth.

FastAPI's guess misses what hatchd does its own way: handlers parse their bodies themselves
(api/validation.py, for exact messages), every failure is {"error": "..."} with a status FastAPI
cannot see, and a validation error is 400, never 422. Routes declare those with the helpers
below (`responses=errors(...)`, `openapi_extra=json_body(...)`); build() adds the input models
and drops the 422s."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from fastapi import FastAPI
from fastapi.openapi.utils import get_openapi
from fastapi.routing import APIRoute
from pydantic import BaseModel
from pydantic.json_schema import models_json_schema

from hatchvm import __version__
from hatchvm.api.outputs import Error, ExecEvent
from hatchvm.api.schemas import INPUT_MODELS

REF = "#/components/schemas/{model}"

ERRORS: dict[int, str] = {
    400: "Bad input: invalid JSON, not an object, an unknown field, a wrong type, a value out "
    "of range (the message names the field)",
    401: "No API key, or an unknown or revoked one",
    403: "Quota reached",
    404: "No such resource, or it belongs to another user",
    409: "The VM's state (or the resource's use) forbids the operation",
    413: "The request body is over 1 MiB (the connection is closed)",
    500: "The operation failed inside hatchd (the message says why; the reason is logged)",
    501: "The VM's VMM driver cannot do this yet (the message names the capability)",
    502: "The VM's guest agent answered nonsense (the connection to it was dropped)",
    503: "Something hatchd needs is missing or unreachable (the image, the network, the "
    "authentication server, a VM's guest agent)",
    504: "The VM's guest agent stopped answering midway",
}

# Every call through a VM's guest agent: bad input or a command that cannot run (400), the
# VM, a path or a process not found (404), no agent or a state or file that forbids it (409),
# a VMM driver without an agent channel (501), the agent answering nonsense (502), absent or
# busy (503), stalling (504).
GUEST = (400, 404, 409, 501, 502, 504)

# Every authenticated operation: a bad key, an unreachable auth server, a body too large.
AUTHENTICATED = (401, 413, 503)

DESCRIPTION = (
    "Self-hosted microVMs: create, snapshot and wake VMs, route HTTP to them by subdomain. "
    'Every failure is `{"error": "<message>"}`. A wrong method on a known path is 405 '
    "with an `Allow` header."
)


def errors(*statuses: int) -> dict[int | str, dict[str, Any]]:
    """`responses=` for a route: each status answered with the Error object."""
    return {s: {"model": Error, "description": ERRORS[s]} for s in sorted(statuses)}


def links(status: int, **targets: dict[str, Any]) -> dict[int | str, dict[str, Any]]:
    """`responses=` entry: OpenAPI links from this answer to the operations that take its ids
    (clients and stateful test tools follow them: create a VM, then stop it, snapshot it...).
    Each target is an operationId with its parameters, and `requestBody` if it has one."""
    out = {}
    for op, values in targets.items():
        link: dict[str, Any] = {"operationId": op}
        if params := {k: v for k, v in values.items() if k != "requestBody"}:
            link["parameters"] = params
        if "requestBody" in values:
            link["requestBody"] = values["requestBody"]
        out[op] = link
    return {status: {"links": out}}


# Where an answer's ids are, for links().
VM_ID = {"vm_id": "$response.body#/id"}
SNAPSHOT_ID = {"snapshot_id": "$response.body#/id"}
ROUTE_ID = {"route_id": "$response.body#/id"}
# Everything that can be done with the VM an answer describes. Streamed operations (the
# console, which can follow forever, exec streams, files) are left out: a test tool following
# links would hang on them or send them random bytes they cannot judge.
VM_LINKS: dict[str, dict[str, Any]] = {
    op: VM_ID
    for op in """get_vm stop_vm start_vm delete_vm snapshot_vm restore_vm list_snapshots
    create_route list_routes""".split()
}


def json_errors(*statuses: int) -> dict[int | str, dict[str, Any]]:
    """errors() for a route whose answer is not JSON: each status's Error object stated by
    schema (FastAPI would give a model the route's own media type)."""
    error = {"application/json": {"schema": {"$ref": REF.format(model="Error")}}}
    return {s: {"description": ERRORS[s], "content": error} for s in sorted(statuses)}


def json_body(model: type[BaseModel], *, required: bool) -> dict[str, Any]:
    """`openapi_extra=` for a handler that parses model from its body with parse_body.
    An empty body counts as {} there, so a model with no required field needs no body."""
    schema = {"$ref": REF.format(model=model.__name__)}
    return {
        "requestBody": {"required": required, "content": {"application/json": {"schema": schema}}}
    }


def operation_id(route: APIRoute) -> str:
    """The handler's name (create_vm, list_snapshots, ...), not FastAPI's path mangling."""
    return route.name


def install(app: FastAPI) -> None:
    app.openapi = _builder(app)  # type: ignore[method-assign]


def _builder(app: FastAPI) -> Callable[[], dict[str, Any]]:
    def build() -> dict[str, Any]:
        if app.openapi_schema is None:
            app.openapi_schema = _document(app)
        return app.openapi_schema

    return build


def _document(app: FastAPI) -> dict[str, Any]:
    doc = get_openapi(
        title="hatchvm", version=__version__, description=DESCRIPTION, routes=app.routes
    )
    schemas = doc.setdefault("components", {}).setdefault("schemas", {})
    # Input models, and output models that no route returns as JSON (the lines of a stream).
    _, defs = models_json_schema(
        [(model, "validation") for model in INPUT_MODELS] + [(ExecEvent, "serialization")],
        ref_template=REF,
    )
    schemas.update(defs.get("$defs", {}))
    # FastAPI adds 422 to every operation with a parameter; hatchd answers 400 instead.
    for path_item in doc["paths"].values():
        for operation in path_item.values():
            responses = operation["responses"]
            responses.pop("422", None)
            operation["responses"] = dict(sorted(responses.items()))
    for name in ("HTTPValidationError", "ValidationError"):
        schemas.pop(name, None)
    return doc
