"""Options shared by every command (where hatchd is, which key to use)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Annotated

import typer

from hatchvm.client import HatchClient

JsonOption = Annotated[bool, typer.Option("--json", help="Print JSON instead of a table.")]


@dataclass
class Connection:
    url: str | None
    key: str | None

    def client(self) -> HatchClient:
        return HatchClient(self.url, self.key)


def connection(ctx: typer.Context) -> Connection:
    conn = ctx.find_root().obj
    return conn if isinstance(conn, Connection) else Connection(None, None)
