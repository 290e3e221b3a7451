"""`hatchvm snapshot ...` and `hatchvm vm snapshot|restore`: freeze VMs and resume them."""

from __future__ import annotations

from typing import Annotated, Any

import typer

from hatchvm.cli.context import JsonOption, connection
from hatchvm.cli.errors import reports_errors
from hatchvm.cli.output import show

app = typer.Typer(help="List, show and delete snapshots.", no_args_is_help=True)

SNAPSHOT_COLUMNS = [
    ("ID", "id"),
    ("VM", "vm_id"),
    ("STATUS", "status"),
    ("SIZE", "size"),
    ("AUTO", "automatic"),
    ("STORED IN", "where"),
    ("CREATED", "created_at"),
]

SnapshotId = Annotated[str, typer.Argument(help="The snapshot's id (snap_...).")]


def _mib(size: int) -> str:
    return f"{size / (1 << 20):.1f} MiB"


def readable(snap: dict[str, Any]) -> dict[str, Any]:
    """The snapshot for people: sizes in MiB, the store on one line."""
    storage = snap.get("storage") or {}
    artifacts = snap.get("artifacts") or {}
    return {
        "id": snap.get("id"),
        "vm_id": snap.get("vm_id"),
        "status": snap.get("status"),
        **({"status_reason": snap["status_reason"]} if snap.get("status_reason") else {}),
        "size": _mib(int(snap.get("size_bytes") or 0)),
        "automatic": snap.get("automatic"),
        "where": f"{storage.get('backend')}: {storage.get('location')}",
        **{
            f"{name} (stored/raw)": f"{_mib(a['size_bytes'])} / {_mib(a['raw_bytes'])}"
            for name, a in artifacts.items()
        },
        "created_at": snap.get("created_at"),
    }


def show_snapshot(snap: Any, as_json: bool) -> None:
    show(snap if as_json else readable(snap), as_json)


@app.command("list")
@reports_errors
def list_snapshots(
    ctx: typer.Context,
    vm_id: Annotated[str, typer.Argument(help="The VM's id (vm_...).")],
    as_json: JsonOption = False,
) -> None:
    """A VM's snapshots, newest first."""
    with connection(ctx).client() as api:
        snaps = api.list_snapshots(vm_id)
    show(snaps if as_json else [readable(s) for s in snaps], as_json, SNAPSHOT_COLUMNS)


@app.command("get")
@reports_errors
def get(ctx: typer.Context, snapshot_id: SnapshotId, as_json: JsonOption = False) -> None:
    """Show one snapshot."""
    with connection(ctx).client() as api:
        show_snapshot(api.get_snapshot(snapshot_id), as_json)


@app.command("delete")
@reports_errors
def delete(ctx: typer.Context, snapshot_id: SnapshotId, as_json: JsonOption = False) -> None:
    """Delete a snapshot and its stored artifacts."""
    with connection(ctx).client() as api:
        result = api.delete_snapshot(snapshot_id)
    if as_json:
        show(result, True)
    else:
        typer.echo(f"deleted {snapshot_id}")
