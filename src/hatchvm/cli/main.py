"""`hatchvm`: the command line, on top of the Python SDK (hatchvm.client)."""

from __future__ import annotations

from typing import Annotated

import typer

from hatchvm.cli import images, keys, routes, snapshots, vms
from hatchvm.cli.context import Connection

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
) -> None:
    ctx.obj = Connection(url, key)


if __name__ == "__main__":
    app()
