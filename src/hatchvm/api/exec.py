"""/vms/{id}/exec: run a command in the guest, its output collected (or streamed as NDJSON),
or start it in the background."""

from __future__ import annotations

import codecs
from collections.abc import AsyncIterator

from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse, StreamingResponse
from pydantic import BaseModel

from hatchvm.agent.exec import Command, Exit, Output
from hatchvm.api.deps import Svc, User
from hatchvm.api.openapi import AUTHENTICATED, GUEST, REF, errors, json_body, json_errors
from hatchvm.api.outputs import (
    ExecEvent,
    ExecResult,
    ExecTimedOut,
    Process,
    render_exec,
    render_exit,
    render_process,
)
from hatchvm.api.schemas import ExecRequest
from hatchvm.api.validation import parse_body
from hatchvm.errors import BadRequest, HatchError

router = APIRouter(tags=["exec"])

NDJSON = "application/x-ndjson"


async def _command(request: Request) -> tuple[ExecRequest, Command]:
    body = await parse_body(request, ExecRequest)
    try:
        return body, body.command()
    except ValueError as exc:
        raise BadRequest(str(exc)) from None


@router.post(
    "/vms/{vm_id}/exec",
    response_model=ExecResult,
    responses={
        201: {"model": Process, "description": "background: the process, started"},
        **errors(*AUTHENTICATED, 500, *GUEST),
        504: {
            "model": ExecTimedOut,
            "description": "The command ran past timeout_s and was killed with its process "
            "group (the error names it; the output until then comes with it), or the guest "
            "agent stopped answering midway",
        },
    },
    openapi_extra=json_body(ExecRequest, required=True),
)
async def exec_vm(vm_id: str, request: Request, user: User, svc: Svc) -> ExecResult | JSONResponse:
    body, command = await _command(request)
    if body.background:
        process = await svc.execs.start_background(user, vm_id, command)
        return JSONResponse(render_process(process).model_dump(), status_code=201)
    result = render_exec(await svc.execs.run(user, vm_id, command))
    if result.timed_out:  # an error naming the timeout, with what the command wrote until then
        error = f"the command timed out after {command.timeout_s:g} s (timeout_s) and was killed"
        return JSONResponse({"error": error, **result.model_dump()}, status_code=504)
    return result


@router.post(
    "/vms/{vm_id}/exec/stream",
    response_class=StreamingResponse,
    responses={
        200: {
            "description": "One JSON object a line, as they happen: started (pid), stdout and "
            "stderr (data), then exit (exit_code, signal, timed_out), or error if the stream "
            "broke off",
            "content": {NDJSON: {"schema": {"$ref": REF.format(model="ExecEvent")}}},
        },
        **json_errors(*AUTHENTICATED, 500, *GUEST),
    },
    openapi_extra=json_body(ExecRequest, required=True),
)
async def exec_vm_stream(vm_id: str, request: Request, user: User, svc: Svc) -> StreamingResponse:
    body, command = await _command(request)
    if body.background:
        raise BadRequest("background: not with exec/stream (use POST /vms/{id}/exec)")
    pid, events = await svc.execs.stream(user, vm_id, command)
    return StreamingResponse(_ndjson(pid, events), media_type=NDJSON)


def _line(event: BaseModel) -> bytes:
    return event.model_dump_json(exclude_none=True).encode() + b"\n"


async def _ndjson(pid: int, events: AsyncIterator[Output | Exit]) -> AsyncIterator[bytes]:
    # Output comes in frames that may split a UTF-8 character: decoded per stream, in order.
    decoders = {s: codecs.getincrementaldecoder("utf-8")("replace") for s in ("stdout", "stderr")}
    try:
        yield _line(ExecEvent(type="started", pid=pid))
        async for event in events:
            if isinstance(event, Output):
                if text := decoders[event.stream].decode(event.data):
                    yield _line(ExecEvent(type=event.stream, data=text))
                continue
            for stream, decoder in decoders.items():
                if rest := decoder.decode(b"", final=True):
                    yield _line(ExecEvent(type=stream, data=rest))  # type: ignore[arg-type]
            yield _line(render_exit(event))
    except HatchError as exc:  # the answer has begun: the failure is its last line
        yield _line(ExecEvent(type="error", error=exc.message))
    finally:
        await events.aclose()  # type: ignore[attr-defined]
