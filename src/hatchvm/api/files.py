"""/vms/{id}/files: a guest's files, uploaded and downloaded as raw bytes streamed both ways,
stat, list and delete. `path` is always an absolute path in the guest."""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import Annotated

import structlog
from fastapi import APIRouter, Query, Request
from fastapi.responses import StreamingResponse
from starlette.requests import ClientDisconnect

from hatchvm.api.body_limit import MAX_UPLOAD_BYTES
from hatchvm.api.deps import Svc, User
from hatchvm.api.openapi import AUTHENTICATED, GUEST, errors, json_errors
from hatchvm.api.outputs import Deleted, FileInfo, FileList, render_file, render_listing
from hatchvm.errors import BadRequest, HatchError

log = structlog.get_logger("hatchvm.api")

router = APIRouter(tags=["files"])

Path = Annotated[
    str,
    Query(
        min_length=1,
        max_length=4096,
        pattern=r"^/[^\x00]*$",
        description="an absolute path in the guest",
    ),
]

_UPLOAD_ERRORS = errors(*AUTHENTICATED, 500, *GUEST)
_UPLOAD_ERRORS[413] = {
    **_UPLOAD_ERRORS[413],
    "description": f"The file is over {MAX_UPLOAD_BYTES} bytes (the connection is closed)",
}
_RAW = {"schema": {"type": "string", "format": "binary"}}


@router.put(
    "/vms/{vm_id}/files",
    responses=_UPLOAD_ERRORS,
    openapi_extra={
        "requestBody": {
            "required": True,
            "description": "the file's bytes, raw (any Content-Type)",
            "content": {"application/octet-stream": _RAW},
        }
    },
)
async def upload_file(
    vm_id: str,
    request: Request,
    user: User,
    svc: Svc,
    path: Path,
    mode: Annotated[
        str | None,
        Query(
            pattern=r"^0?[0-7]{3,4}$",
            description="permission bits, octal; default: the replaced file's, or 0644",
        ),
    ] = None,
    parents: Annotated[bool, Query(description="create missing parent directories")] = False,
) -> FileInfo:
    """Create or replace the file with the request's body. It appears whole when the upload
    ends, or not at all."""
    try:
        stat = await svc.files.upload(
            user,
            vm_id,
            path,
            request.stream(),
            mode=None if mode is None else int(mode, 8),
            parents=parents,
        )
    except ClientDisconnect:
        raise BadRequest("the upload ended before its body did") from None
    return render_file(path, stat)


@router.get(
    "/vms/{vm_id}/files",
    response_class=StreamingResponse,
    responses={
        200: {
            "description": "The file's bytes, streamed",
            "content": {"application/octet-stream": _RAW},
        },
        **json_errors(*AUTHENTICATED, 500, *GUEST),
    },
)
async def download_file(vm_id: str, path: Path, user: User, svc: Svc) -> StreamingResponse:
    stat, chunks = await svc.files.download(user, vm_id, path)
    return StreamingResponse(
        _aborting(vm_id, path, chunks),
        media_type="application/octet-stream",
        headers={"X-File-Size": str(stat.size), "X-File-Mode": f"{stat.mode:04o}"},
    )


async def _aborting(vm_id: str, path: str, chunks: AsyncIterator[bytes]) -> AsyncIterator[bytes]:
    """The bytes; a failure midway breaks the connection off (no last chunk), so the client
    cannot take a cut file for a whole one."""
    try:
        async for chunk in chunks:
            yield chunk
    except HatchError as exc:
        log.warning("download broke off", vm_id=vm_id, path=path, reason=exc.message)
        raise
    finally:
        await chunks.aclose()  # type: ignore[attr-defined]


@router.get("/vms/{vm_id}/files/stat", responses=errors(*AUTHENTICATED, 500, *GUEST))
async def stat_file(vm_id: str, path: Path, user: User, svc: Svc) -> FileInfo:
    """What is at path (symlinks followed)."""
    return render_file(path, await svc.files.stat(user, vm_id, path))


@router.get("/vms/{vm_id}/files/list", responses=errors(*AUTHENTICATED, 500, *GUEST))
async def list_files(vm_id: str, path: Path, user: User, svc: Svc) -> FileList:
    """The directory's entries, by name (symlinks not followed), at most 10000."""
    entries, truncated = await svc.files.list(user, vm_id, path)
    return render_listing(path, entries, truncated)


@router.delete("/vms/{vm_id}/files", responses=errors(*AUTHENTICATED, 500, *GUEST))
async def delete_file(
    vm_id: str,
    path: Path,
    user: User,
    svc: Svc,
    recursive: Annotated[bool, Query(description="a directory with everything in it")] = False,
) -> Deleted:
    await svc.files.delete(user, vm_id, path, recursive=recursive)
    return Deleted()
