"""`hatchvm cp`: copy a file into a VM or out of it, streamed (any size, bounded memory).
One side is VM:PATH (an absolute path in the guest), the other a local path or - (stdin or
stdout)."""

from __future__ import annotations

import os
import re
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Annotated, BinaryIO

import typer

from hatchvm.cli.context import connection
from hatchvm.cli.errors import reports_errors
from hatchvm.errors import BadRequest

REMOTE = re.compile(r"^(vm_[a-z0-9]+):(/.*)$")
CHUNK = 1 << 20


def _remote(spec: str) -> tuple[str, str] | None:
    match = REMOTE.match(spec)
    return (match.group(1), match.group(2)) if match else None


def _chunks(source: BinaryIO) -> Iterator[bytes]:
    while chunk := source.read(CHUNK):
        yield chunk


@reports_errors
def cp_command(
    ctx: typer.Context,
    source: Annotated[str, typer.Argument(help="LOCAL, - or VM:PATH.", show_default=False)],
    dest: Annotated[str, typer.Argument(help="VM:PATH, LOCAL or -.", show_default=False)],
    mode: Annotated[
        str | None, typer.Option(help="Permission bits of an uploaded file, octal (0644).")
    ] = None,
    parents: Annotated[
        bool, typer.Option("--parents", "-p", help="Create missing directories in the VM.")
    ] = False,
) -> None:
    """Copy a file into a VM (hatchvm cp ./app.tar vm_x:/root/) or out (vm_x:/etc/os-release .)."""
    up, down = _remote(dest), _remote(source)
    if (up is None) == (down is None):
        raise BadRequest("one side, and one only, must be VM:/absolute/path")
    with connection(ctx).client() as api:
        if up is not None:
            vm_id, path = up
            if path.endswith("/"):
                if source == "-":
                    raise BadRequest("name the file in the VM when copying from stdin")
                path += Path(source).name
            bits = None if mode is None else int(mode, 8)
            if source == "-":
                info = api.upload_file(
                    vm_id, path, _chunks(sys.stdin.buffer), mode=bits, parents=parents
                )
            else:
                with open(source, "rb") as local:
                    info = api.upload_file(vm_id, path, _chunks(local), mode=bits, parents=parents)
            typer.echo(f"{source} -> {vm_id}:{info['path']} ({info['size']} bytes)", err=True)
            return
        assert down is not None
        vm_id, path = down
        if dest == "-":
            for chunk in api.download_file(vm_id, path):
                sys.stdout.buffer.write(chunk)
            sys.stdout.buffer.flush()
            return
        target = Path(dest)
        if target.is_dir():
            target = target / Path(path).name
        partial = target.with_name(f".{target.name}.partial")
        size = 0
        try:
            with open(partial, "wb") as local:
                for chunk in api.download_file(vm_id, path):
                    local.write(chunk)
                    size += len(chunk)
            os.replace(partial, target)  # whole, or not at all
        finally:
            partial.unlink(missing_ok=True)
        typer.echo(f"{vm_id}:{path} -> {target} ({size} bytes)", err=True)
