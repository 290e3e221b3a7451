"""`hatchvm keys ...`: local API keys, managed on the daemon's host (only hashes are stored)."""

from __future__ import annotations

import asyncio
import dataclasses
from typing import Annotated, Any

import typer

from hatchvm import admin
from hatchvm.cli.context import JsonOption
from hatchvm.cli.errors import reports_errors
from hatchvm.cli.output import err, print_json, show
from hatchvm.config import load_settings

app = typer.Typer(help="Create, list and revoke local API keys.", no_args_is_help=True)

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


@app.command("create")
@reports_errors
def create(
    user: Annotated[str, typer.Option("--user", help="The user the key acts as.")],
    as_json: JsonOption = False,
) -> None:
    """Create a key for USER and print it (it is shown only this once)."""
    info, key = asyncio.run(admin.create_key(load_settings(), user))
    if as_json:
        print_json({**_plain(info), "key": key})
        return
    print(key)
    err.print(f"key {info.id} for user {info.user_id!r}: store it now, it is not shown again")


@app.command("list")
@reports_errors
def list_keys(as_json: JsonOption = False) -> None:
    """List keys (their prefixes, never the keys themselves)."""
    rows = [_plain(info) for info in asyncio.run(admin.list_keys(load_settings()))]
    show(rows, as_json, KEY_COLUMNS)


@app.command("revoke")
@reports_errors
def revoke(
    key_id: Annotated[str, typer.Argument(help="The key's id (key_...).", show_default=False)],
    as_json: JsonOption = False,
) -> None:
    """Revoke a key; requests using it are refused from now on."""
    info = asyncio.run(admin.revoke_key(load_settings(), key_id))
    if as_json:
        print_json(_plain(info))
    else:
        print(f"revoked {info.id} (user {info.user_id})")
