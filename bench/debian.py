"""Debian packages the benchmarks need (not the daemon): installed on first use, without
starting their services (policy-rc.d), since the benchmarks run their own instances."""

from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path

POLICY = Path("/usr/sbin/policy-rc.d")


def ensure_packages(packages: list[str]) -> None:
    missing = [p for p in packages if shutil.which(p) is None]
    if not missing:
        return
    if os.geteuid() != 0:
        raise SystemExit(f"missing {' '.join(missing)}: run as root, or apt-get install them")
    print(f"installing Debian packages: {' '.join(missing)}", flush=True)
    had_policy = POLICY.exists()
    if not had_policy:
        POLICY.write_text("#!/bin/sh\nexit 101\n")  # "do not start services"
        POLICY.chmod(0o755)
    try:
        env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
        subprocess.run(
            ["apt-get", "install", "-y", "-q", "--no-install-recommends", *missing],
            env=env,
            check=True,
        )
    finally:
        if not had_policy:
            POLICY.unlink(missing_ok=True)
