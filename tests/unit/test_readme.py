"""README's configuration table lists every setting hatchd reads."""

from __future__ import annotations

import re
from pathlib import Path

from hatchvm.config import Settings

README = Path(__file__).resolve().parents[2] / "README.md"


def test_every_setting_is_in_the_configuration_table() -> None:
    rows = [line for line in README.read_text().splitlines() if line.startswith("| `HATCH_")]
    listed = {name for row in rows for name in re.findall(r"`(HATCH_[A-Z0-9_]+)`", row)}
    settings = {f"HATCH_{name.upper()}" for name in Settings.model_fields}
    assert settings - listed == set(), "settings missing from README's table"
    assert listed - settings == set(), "README's table lists settings that do not exist"
