"""The per-VM writable disk: a real ext4 file, read back with debugfs (no mounts)."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
from pathlib import Path

import pytest

from hatchvm.images.disk import create_vm_disk
from hatchvm.images.errors import UserDataError

pytestmark = pytest.mark.skipif(
    shutil.which("mkfs.ext4") is None or shutil.which("debugfs") is None,
    reason="needs mkfs.ext4 and debugfs (e2fsprogs)",
)

KEY = "ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIGb3xTmTSjXXK0m7aSbKz6qB7v8k7k5z8cZt9bJ7yX3Q me@host"


def debugfs(disk: Path, request: str) -> str:
    result = subprocess.run(
        ["debugfs", "-R", request, str(disk)], capture_output=True, text=True, check=True
    )
    return result.stdout


def cat(disk: Path, path: str) -> str:
    return debugfs(disk, f"cat {path}")


def stat(disk: Path, path: str) -> tuple[int, int, int]:
    """(permission bits, uid, gid) of a file inside the image."""
    out = debugfs(disk, f"stat {path}")
    mode = re.search(r"Mode:\s+0?(\d+)", out)
    owner = re.search(r"User:\s+(\d+)\s+Group:\s+(\d+)", out)
    assert mode and owner, f"{path} not in the image: {out}"
    return int(mode.group(1), 8), int(owner.group(1)), int(owner.group(2))


def names(disk: Path, path: str) -> set[str]:
    """Entries of a directory inside the image (`ls -p` lines: /inode/mode/uid/gid/name/size/)."""
    return {line.split("/")[5] for line in debugfs(disk, f"ls -p {path}").splitlines() if line}


def exists(disk: Path, path: str) -> bool:
    return (
        "File not found"
        not in subprocess.run(
            ["debugfs", "-R", f"stat {path}", str(disk)], capture_output=True, text=True
        ).stderr
    )


def test_disk_is_sparse_ext4_with_label(tmp_path: Path) -> None:
    disk = tmp_path / "disk.ext4"
    create_vm_disk(disk, 1024, "vm-abc", None)
    st = disk.stat()
    assert st.st_size == 1024 * 1024 * 1024
    # Sparse: the metadata only, the 16 MiB journal a hole (mke2fs does not zero it).
    assert st.st_blocks * 512 < 4 * 1024 * 1024
    out = subprocess.run(
        ["dumpe2fs", "-h", str(disk)], capture_output=True, text=True, check=True
    ).stdout
    assert re.search(r"Filesystem volume name:\s+hatchdisk", out)
    assert "has_journal" in out
    assert re.search(r"Total journal size:\s+16M", out)
    assert not (tmp_path / ".disk.ext4.tmp").exists()


def test_overlay_dirs_and_hostname(tmp_path: Path) -> None:
    disk = tmp_path / "disk.ext4"
    create_vm_disk(disk, 64, "vm-abc", None)
    assert cat(disk, "/upper/etc/hostname") == "vm-abc\n"
    assert stat(disk, "/upper/etc/hostname") == (0o644, 0, 0)
    # The overlay's root directory takes upper/'s mode: it must be a normal root dir.
    assert stat(disk, "/upper") == (0o755, 0, 0)
    assert stat(disk, "/work") == (0o755, 0, 0)
    assert names(disk, "/work") == {".", ".."}  # overlayfs wants an empty workdir
    assert names(disk, "/upper") == {".", "..", "etc"}
    assert not exists(disk, "/upper/etc/hatch/user-data")
    assert not exists(disk, "/upper/root/.ssh/authorized_keys")


def test_script_user_data_and_key_comments(tmp_path: Path) -> None:
    disk = tmp_path / "disk.ext4"
    script = f"#!/bin/sh\n# ssh-authorized-key: {KEY}\necho hello\n"
    create_vm_disk(disk, 64, "vm-abc", script)
    assert cat(disk, "/upper/etc/hatch/user-data") == script
    assert stat(disk, "/upper/etc/hatch/user-data") == (0o755, 0, 0)
    assert stat(disk, "/upper/etc/hatch") == (0o755, 0, 0)
    assert cat(disk, "/upper/root/.ssh/authorized_keys") == KEY + "\n"
    assert stat(disk, "/upper/root/.ssh/authorized_keys") == (0o600, 0, 0)
    assert stat(disk, "/upper/root/.ssh") == (0o700, 0, 0)
    assert stat(disk, "/upper/root") == (0o700, 0, 0)


def test_cloud_config_becomes_script_and_keys(tmp_path: Path) -> None:
    disk = tmp_path / "disk.ext4"
    user_data = f"#cloud-config\nssh_authorized_keys:\n  - {KEY}\nruncmd:\n  - [touch, /tmp/a b]\n"
    create_vm_disk(disk, 64, "vm-abc", user_data)
    assert cat(disk, "/upper/etc/hatch/user-data") == "#!/bin/sh\ntouch '/tmp/a b'\n"
    assert stat(disk, "/upper/etc/hatch/user-data")[0] == 0o755
    assert cat(disk, "/upper/root/.ssh/authorized_keys") == KEY + "\n"


def test_modes_do_not_depend_on_umask(tmp_path: Path) -> None:
    disk = tmp_path / "disk.ext4"
    old = os.umask(0o077)
    try:
        create_vm_disk(disk, 64, "vm-abc", "#!/bin/sh\ntrue\n")
    finally:
        os.umask(old)
    assert stat(disk, "/upper")[0] == 0o755
    assert stat(disk, "/upper/etc")[0] == 0o755
    assert stat(disk, "/upper/etc/hostname")[0] == 0o644
    assert stat(disk, "/upper/etc/hatch/user-data")[0] == 0o755


def test_bad_user_data_creates_nothing(tmp_path: Path) -> None:
    disk = tmp_path / "disk.ext4"
    with pytest.raises(UserDataError, match="user_data: unsupported cloud-config key 'users'"):
        create_vm_disk(disk, 64, "vm-abc", "#cloud-config\nusers: []\n")
    assert list(tmp_path.iterdir()) == []


def test_bad_hostname_is_refused(tmp_path: Path) -> None:
    with pytest.raises(UserDataError, match="hostname"):
        create_vm_disk(tmp_path / "disk.ext4", 64, "a b\n", None)
    assert list(tmp_path.iterdir()) == []


def test_recreating_replaces_the_disk(tmp_path: Path) -> None:
    disk = tmp_path / "disk.ext4"
    create_vm_disk(disk, 64, "first", None)
    create_vm_disk(disk, 64, "second", None)
    assert cat(disk, "/upper/etc/hostname") == "second\n"
