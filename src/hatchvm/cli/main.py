"""`hatchvm`: the command line, on top of the Python SDK (hatchvm.client)."""

from __future__ import annotations

import os
from typing import Annotated

import typer

from hatchvm import __version__
from hatchvm.cli import exec, files, images, keys, routes, snapshots, vms
from hatchvm.cli.context import Connection
from hatchvm.private import PRIVATE_UMASK

app = typer.Typer(
    help="hatchvm: microVMs behind one API.",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    add_completion=False,
)
app.add_typer(vms.app, name="vm")
app.add_typer(snapshots.app, name="snapshot")
app.add_typer(routes.app, name="route")
app.add_typer(images.app, name="image")
app.add_typer(keys.app, name="keys")
app.command("exec")(exec.exec_command)
app.command("cp")(files.cp_command)


def _print_version(value: bool) -> None:
    if value:
        print(f"hatchvm {__version__}")
        raise typer.Exit()


@app.callback()
def main(
    ctx: typer.Context,
    url: Annotated[
        str | None,
        typer.Option(envvar="HATCH_API_URL", help="hatchd's API (default http://127.0.0.1:8080)."),
    ] = None,
    key: Annotated[
        str | None, typer.Option(envvar="HATCH_API_KEY", help="API key.", show_default=False)
    ] = None,
    version: Annotated[
        bool,
        typer.Option(
            "--version", callback=_print_version, is_eager=True, help="Print the version."
        ),
    ] = False,
) -> None:
    os.umask(PRIVATE_UMASK)  # what the CLI writes (database, images) is private
    ctx.obj = Connection(url, key)


if __name__ == "__main__":
    app()
