"""A real OpenSSH client for tests: a throwaway key and one command over the SSH gateway."""

from __future__ import annotations

import subprocess
from pathlib import Path
from typing import BinaryIO


def ssh_key(tmp_path: Path) -> tuple[Path, str]:
    key = tmp_path / "id_ed25519"
    subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", str(key)], check=True)
    return key, (tmp_path / "id_ed25519.pub").read_text().strip()


def ssh(
    key: Path, port: int, command: str, timeout: float = 120, stdin: BinaryIO | None = None
) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [
            "ssh",
            "-i", str(key),
            "-p", str(port),
            "-o", "BatchMode=yes",
            "-o", "StrictHostKeyChecking=no",
            "-o", "UserKnownHostsFile=/dev/null",
            "-o", "LogLevel=ERROR",
            "-o", f"ConnectTimeout={int(timeout)}",
            "root@127.0.0.1",
            command,
        ],
        stdin=stdin,
        capture_output=True,
        text=True,
        timeout=timeout + 30,
    )  # fmt: skip
