"""`hatchvm route ...`: subdomains that reach a port inside a VM (and wake it)."""

from __future__ import annotations

from typing import Annotated

import typer

from hatchvm.cli.context import JsonOption, connection
from hatchvm.cli.errors import reports_errors
from hatchvm.cli.output import show

app = typer.Typer(help="Create, list and delete HTTP routes to VMs.", no_args_is_help=True)

ROUTE_COLUMNS = [
    ("ID", "id"),
    ("VM", "vm_id"),
    ("URL", "url"),
    ("PORT", "target_port"),
    ("WAKE", "auto_wake"),
    ("CREATED", "created_at"),
]

VmId = Annotated[str, typer.Argument(help="The VM's id (vm_...).", show_default=False)]


@app.command("create")
@reports_errors
def create(
    ctx: typer.Context,
    vm_id: VmId,
    port: Annotated[int, typer.Option("--port", help="Port inside the VM (1-65535).")],
    subdomain: Annotated[
        str | None, typer.Option(help="Subdomain (default: 12 random letters/digits).")
    ] = None,
    wake: Annotated[
        bool, typer.Option("--wake/--no-wake", help="Wake the VM when a request arrives.")
    ] = True,
    as_json: JsonOption = False,
) -> None:
    """Route <subdomain>.<base domain> to a port of the VM."""
    with connection(ctx).client() as api:
        route = api.create_route(vm_id, port, subdomain, None if wake else False)
    show(route, as_json)


@app.command("list")
@reports_errors
def list_routes(ctx: typer.Context, vm_id: VmId, as_json: JsonOption = False) -> None:
    """A VM's routes, newest first."""
    with connection(ctx).client() as api:
        show(api.list_routes(vm_id), as_json, ROUTE_COLUMNS)


@app.command("delete")
@reports_errors
def delete(
    ctx: typer.Context,
    route_id: Annotated[str, typer.Argument(help="The route's id (rt_...).")],
    as_json: JsonOption = False,
) -> None:
    """Delete a route."""
    with connection(ctx).client() as api:
        result = api.delete_route(route_id)
    if as_json:
        show(result, True)
    else:
        typer.echo(f"deleted {route_id}")
