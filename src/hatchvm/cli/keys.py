"""`hatchvm keys ...`: local API keys, managed on the daemon's host (only hashes are stored)."""

from __future__ import annotations

import asyncio
import dataclasses
from typing import TYPE_CHECKING, Annotated, Any

import typer

from hatchvm.cli.context import JsonOption, connection
from hatchvm.cli.errors import reports_errors
from hatchvm.cli.output import err, print_json, show
from hatchvm.client import HatchAPIError, HatchClient
from hatchvm.config import Settings, load_settings
from hatchvm.errors import BadRequest

if TYPE_CHECKING:
    from hatchvm import admin

app = typer.Typer(
    help="Create, list and revoke hatchd's local API keys (not Better Auth's).",
    no_args_is_help=True,
)

KEY_COLUMNS = [
    ("ID", "id"),
    ("USER", "user_id"),
    ("PREFIX", "prefix"),
    ("CREATED", "created_at"),
    ("REVOKED", "revoked_at"),
]


def _plain(info: admin.KeyInfo) -> dict[str, Any]:
    row = dataclasses.asdict(info)
    for name in ("created_at", "revoked_at"):
        if row[name] is not None:
            row[name] = row[name].isoformat(timespec="seconds")
    return row


def local_settings(ctx: typer.Context) -> Settings:
    """The settings, once it is clear local keys are what hatchd accepts: a key made here for a
    daemon that verifies keys with Better Auth would never be accepted. Notes go to stderr, so
    stdout stays the key alone."""
    settings = load_settings()
    err.print("[dim]note: these are hatchd's local API keys, not Better Auth's[/]", markup=True)
    configured = settings.better_auth_url or _daemon_auth_server(connection(ctx).url)
    if configured:
        raise BadRequest(
            f"hatchd verifies API keys with Better Auth ({configured}): local keys would never "
            "be accepted; create users and keys in Better Auth (see deploy/better-auth/README.md)"
        )
    return settings


def _daemon_auth_server(url: str | None) -> str | None:
    """Whether the running daemon, if one answers at once, says it uses Better Auth."""
    with HatchClient(url, api_key="", timeout=2.0) as api:
        try:
            health = api.health()
        except HatchAPIError:
            return None  # no daemon there (yet): the settings alone decide
        if isinstance(health, dict) and health.get("auth") == "better-auth":
            return f"said by the daemon at {api.base_url}"
    return None


@app.command("create")
@reports_errors
def create(
    ctx: typer.Context,
    user: Annotated[str, typer.Option("--user", help="The user the key acts as.")],
    as_json: JsonOption = False,
) -> None:
    """Create a key for USER and print it (it is shown only this once)."""
    from hatchvm import admin  # here: other commands start without it

    info, key = asyncio.run(admin.create_key(local_settings(ctx), user))
    if as_json:
        print_json({**_plain(info), "key": key})
        return
    print(key)
    err.print(f"key {info.id} for user {info.user_id!r}: store it now, it is not shown again")


@app.command("list")
@reports_errors
def list_keys(ctx: typer.Context, as_json: JsonOption = False) -> None:
    """List keys (their prefixes, never the keys themselves)."""
    from hatchvm import admin  # here: other commands start without it

    rows = [_plain(info) for info in asyncio.run(admin.list_keys(local_settings(ctx)))]
    show(rows, as_json, KEY_COLUMNS)


@app.command("revoke")
@reports_errors
def revoke(
    ctx: typer.Context,
    key_id: Annotated[str, typer.Argument(help="The key's id (key_...).", show_default=False)],
    as_json: JsonOption = False,
) -> None:
    """Revoke a key; requests using it are refused from now on."""
    from hatchvm import admin  # here: other commands start without it

    info = asyncio.run(admin.revoke_key(local_settings(ctx), key_id))
    if as_json:
        print_json(_plain(info))
    else:
        print(f"revoked {info.id} (user {info.user_id})")
