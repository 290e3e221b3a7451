"""Where Firecracker's swagger file is: the Firecracker double validates against it, and the
jailer double binds its directory into each jail (without importing the double's heavy
dependencies, so a jailed start stays quick)."""

from __future__ import annotations

import os
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
SWAGGER = Path(
    os.environ.get(
        "HATCH_FIRECRACKER_SWAGGER", REPO.parent / "shared/reference/firecracker-swagger.yaml"
    )
)
