"""A real OpenSSH client for tests: a throwaway key and one command over the SSH gateway."""

from __future__ import annotations

import subprocess
from pathlib import Path
from typing import BinaryIO

from tests.support.wait import wait_for


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


def host_key(port: int, tmp_path: Path) -> str:
    """The ed25519 host key the SSH server behind the gateway's port shows (OpenSSH records it
    before it fails to log in without a key)."""
    known = tmp_path / f"known-{port}"

    def scan() -> str | None:
        known.unlink(missing_ok=True)
        subprocess.run(
            [
                "ssh",
                "-p", str(port),
                "-o", "BatchMode=yes",
                "-o", "StrictHostKeyChecking=accept-new",
                "-o", f"UserKnownHostsFile={known}",
                "-o", "HostKeyAlgorithms=ssh-ed25519",
                "-o", "PubkeyAuthentication=no",
                "-o", "ConnectTimeout=30",
                "root@127.0.0.1",
                "true",
            ],
            capture_output=True,
            timeout=90,
        )  # fmt: skip
        text = known.read_text() if known.exists() else ""
        return text.split(None, 1)[1].strip() if text else None

    return wait_for(scan, 120, f"the host key on port {port}")
