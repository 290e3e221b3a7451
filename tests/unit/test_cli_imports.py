"""The CLI starts without the database stack: only `keys` and `image build` need it."""

from __future__ import annotations

import subprocess
import sys

HEAVY = ("sqlalchemy", "alembic", "hatchvm.admin", "hatchvm.db")


def test_the_cli_loads_no_database_stack_until_a_command_needs_it() -> None:
    probe = (
        "import sys, hatchvm.cli.main\n"
        f"print(*sorted(m for m in {HEAVY!r} if m in sys.modules))\n"
        "from hatchvm import admin\n"  # the positive control: the probe sees an import
        f"print(*sorted(m for m in {HEAVY!r} if m in sys.modules))\n"
    )
    out = subprocess.run(
        [sys.executable, "-c", probe], capture_output=True, text=True, check=True
    ).stdout.splitlines()
    assert out[0] == ""
    assert "sqlalchemy" in out[1].split() and "hatchvm.admin" in out[1].split()
