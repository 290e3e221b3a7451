"""`hatchvm vm ...`: the VM lifecycle through the API."""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Annotated

import typer

from hatchvm.cli.context import JsonOption, connection
from hatchvm.cli.errors import reports_errors
from hatchvm.cli.output import show
from hatchvm.cli.snapshots import show_snapshot
from hatchvm.errors import BadRequest
from hatchvm.net.egress import Egress

app = typer.Typer(
    help="Create, inspect, stop, start, snapshot, restore, fork and delete VMs.",
    no_args_is_help=True,
)

VM_COLUMNS = [
    ("ID", "id"),
    ("STATE", "state"),
    ("IP", "guest_ip"),
    ("SSH", "ssh_port"),
    ("VCPU", "vcpu_count"),
    ("MEM MiB", "mem_mib"),
    ("IMAGE", "image_id"),
    ("CREATED", "created_at"),
]

VmId = Annotated[str, typer.Argument(help="The VM's id (vm_...).", show_default=False)]


def _read_user_data(source: str | None) -> str | None:
    """user_data from a file, or from stdin when the path is '-'."""
    if source is None:
        return None
    if source == "-":
        return sys.stdin.read()
    try:
        return Path(source).read_text()
    except (OSError, UnicodeDecodeError) as exc:
        raise BadRequest(f"--user-data: cannot read {source}: {exc}") from None


@app.command("create")
@reports_errors
def create(
    ctx: typer.Context,
    image: Annotated[str | None, typer.Option(help="Image id (default: img_default).")] = None,
    vcpus: Annotated[int | None, typer.Option(help="Virtual CPUs (1-32).")] = None,
    mem: Annotated[int | None, typer.Option(help="Memory in MiB (128-65536).")] = None,
    network: Annotated[
        bool, typer.Option("--network/--no-network", help="Give the VM a NIC and an IP.")
    ] = True,
    user_data: Annotated[
        str | None,
        typer.Option("--user-data", help="File with a script run at boot ('-' for stdin)."),
    ] = None,
    boot_args: Annotated[str | None, typer.Option(help="Extra kernel parameters.")] = None,
    restart: Annotated[
        str | None,
        typer.Option(help="Restart policy: no (default) or on-failure (after a crash)."),
    ] = None,
    egress: Annotated[
        Egress | None,
        typer.Option(
            help="What the VM may reach beyond the host: the internet (default) or nothing.",
            show_default=False,
        ),
    ] = None,
    as_json: JsonOption = False,
) -> None:
    """Create a VM and wait until it is running."""
    body = _read_user_data(user_data)
    with connection(ctx).client() as api:
        vm = api.create_vm(
            image_id=image,
            vcpu_count=vcpus,
            mem_mib=mem,
            enable_network=None if network else False,
            user_data=body,
            boot_args=boot_args,
            restart=restart,
            egress=egress.value if egress else None,
        )
    show(vm, as_json)


@app.command("list")
@reports_errors
def list_vms(ctx: typer.Context, as_json: JsonOption = False) -> None:
    """List your VMs."""
    with connection(ctx).client() as api:
        show(api.list_vms(), as_json, VM_COLUMNS)


@app.command("get")
@reports_errors
def get(ctx: typer.Context, vm_id: VmId, as_json: JsonOption = False) -> None:
    """Show one VM."""
    with connection(ctx).client() as api:
        show(api.get_vm(vm_id), as_json)


@app.command("stop")
@reports_errors
def stop(ctx: typer.Context, vm_id: VmId, as_json: JsonOption = False) -> None:
    """Power a VM off; its disk and IP are kept."""
    with connection(ctx).client() as api:
        show(api.stop_vm(vm_id), as_json)


@app.command("start")
@reports_errors
def start(ctx: typer.Context, vm_id: VmId, as_json: JsonOption = False) -> None:
    """Boot a stopped VM again (or one in error that still has its disk)."""
    with connection(ctx).client() as api:
        show(api.start_vm(vm_id), as_json)


@app.command("snapshot")
@reports_errors
def snapshot(
    ctx: typer.Context,
    vm_id: VmId,
    wait: Annotated[
        bool, typer.Option("--wait", help="Return once stored, not once captured.")
    ] = False,
    as_json: JsonOption = False,
) -> None:
    """Freeze a running VM into a new snapshot; it stops using CPU and memory. The snapshot is
    `storing` until its files are stored (in the background)."""
    with connection(ctx).client() as api:
        show_snapshot(api.snapshot_vm(vm_id, wait_stored=wait), as_json)


@app.command("restore")
@reports_errors
def restore(
    ctx: typer.Context,
    vm_id: VmId,
    snapshot: Annotated[
        str | None, typer.Option("--snapshot", help="Snapshot id (default: the latest).")
    ] = None,
    as_json: JsonOption = False,
) -> None:
    """Resume a snapshotted VM exactly where it was (or one in error, from a snapshot)."""
    with connection(ctx).client() as api:
        show(api.restore_vm(vm_id, snapshot), as_json)


@app.command("fork")
@reports_errors
def fork(
    ctx: typer.Context,
    source: Annotated[
        str,
        typer.Argument(help="A VM (vm_...) or a stored snapshot (snap_...).", show_default=False),
    ],
    count: Annotated[int, typer.Option("--count", "-n", help="How many new VMs (1-16).")] = 1,
    as_json: JsonOption = False,
) -> None:
    """New VMs running from a VM's memory and disk as they are now, or a snapshot's."""
    with connection(ctx).client() as api:
        if source.startswith("snap_"):
            children = api.fork_snapshot(source, count)
        else:
            children = api.fork_vm(source, count)
        show(children, as_json, VM_COLUMNS)


@app.command("console")
@reports_errors
def console(
    ctx: typer.Context,
    vm_id: VmId,
    lines: Annotated[int, typer.Option(help="How many of the last lines to show.")] = 100,
    follow: Annotated[
        bool, typer.Option("--follow", "-f", help="Keep printing new output as it comes.")
    ] = False,
) -> None:
    """Show the guest's console (its last lines; --follow for new output too)."""
    with connection(ctx).client() as api:
        if not follow:
            sys.stdout.write(api.console(vm_id, lines))
            return
        for chunk in api.follow_console(vm_id, lines):
            sys.stdout.buffer.write(chunk)
            sys.stdout.buffer.flush()


@app.command("delete")
@reports_errors
def delete(ctx: typer.Context, vm_id: VmId, as_json: JsonOption = False) -> None:
    """Delete a VM with its disk; this cannot be undone."""
    with connection(ctx).client() as api:
        result = api.delete_vm(vm_id)
    if as_json:
        show(result, True)
    else:
        typer.echo(f"deleted {vm_id}")
