"""`hatchvm image ...`: build the default guest image (on the daemon's host) and list images."""

from __future__ import annotations

import asyncio
from typing import Annotated

import typer

from hatchvm.cli.context import JsonOption, connection
from hatchvm.cli.errors import reports_errors
from hatchvm.cli.output import err, show
from hatchvm.config import load_settings

app = typer.Typer(help="Build and list guest images.", no_args_is_help=True)

IMAGE_COLUMNS = [("ID", "id"), ("BOOT ARGS", "boot_args"), ("CREATED", "created_at")]


@app.command("build")
@reports_errors
def build(
    force: Annotated[bool, typer.Option("--force", help="Rebuild even if it exists.")] = False,
    as_json: JsonOption = False,
) -> None:
    """Build img_default from Debian packages into HATCH_DATA_DIR and register it.

    Runs on the daemon's host (it writes the image files and the database directly)."""
    settings = load_settings()

    def progress(line: str) -> None:
        err.print(f"[dim]·[/] {line}", markup=True, soft_wrap=True)

    from hatchvm import admin  # here: the other commands start without its database stack

    image = asyncio.run(admin.build_image(settings, progress, force=force))
    show(image, as_json)


@app.command("list")
@reports_errors
def list_images(ctx: typer.Context, as_json: JsonOption = False) -> None:
    """List the registered images."""
    with connection(ctx).client() as api:
        show(api.list_images(), as_json, IMAGE_COLUMNS)


@app.command("get")
@reports_errors
def get(
    ctx: typer.Context,
    image_id: Annotated[str, typer.Argument(help="The image's id.", show_default=False)],
    as_json: JsonOption = False,
) -> None:
    """Show one image."""
    with connection(ctx).client() as api:
        show(api.get_image(image_id), as_json)
