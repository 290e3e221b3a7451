"""How the CLI shows results: rich tables for people, JSON for scripts, one-line errors."""

from __future__ import annotations

import json
import sys
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

from rich.console import Console
from rich.table import Table

# Piped output is not folded to 80 columns, so scripts and `grep` see one line per row.
_PIPE_WIDTH = 10_000
out = Console(highlight=False, width=None if sys.stdout.isatty() else _PIPE_WIDTH)
err = Console(stderr=True, highlight=False, width=None if sys.stderr.isatty() else _PIPE_WIDTH)

MISSING = "-"


def _cell(value: Any) -> str:
    if value is None or value == "":
        return MISSING
    if isinstance(value, bool):
        return "yes" if value else "no"
    return str(value)


def print_json(data: Any) -> None:
    # Plain print, not rich: scripts need exactly the JSON, without markup or wrapping.
    print(json.dumps(data, indent=2, default=str))


def print_table(rows: Iterable[Mapping[str, Any]], columns: Sequence[tuple[str, str]]) -> None:
    """One row per object; columns are (heading, key)."""
    table = Table(box=None, header_style="bold", pad_edge=False)
    for heading, _ in columns:
        table.add_column(heading, overflow="fold")
    for row in rows:
        table.add_row(*(_cell(row.get(key)) for _, key in columns))
    out.print(table)


def print_record(record: Mapping[str, Any]) -> None:
    """One object as aligned `field  value` lines."""
    table = Table(box=None, show_header=False, pad_edge=False)
    table.add_column(style="bold")
    table.add_column(overflow="fold")
    for key, value in record.items():
        table.add_row(key, _cell(value))
    out.print(table)


def show(data: Any, as_json: bool, columns: Sequence[tuple[str, str]] | None = None) -> None:
    """A list as a table (with columns) or an object as a record; JSON when asked."""
    if as_json:
        print_json(data)
    elif isinstance(data, list):
        print_table(data, columns or [(k.upper(), k) for k in (data[0] if data else {})])
    else:
        print_record(data)


def print_error(message: str) -> None:
    err.print(f"[bold red]error:[/] {message}", markup=True, soft_wrap=True)
