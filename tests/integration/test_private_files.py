"""Every file hatchd or the CLI writes under the data directory is the owner's alone."""

from __future__ import annotations

import os
import stat
import subprocess
import sys
from pathlib import Path

import pytest

from tests.support.wait import wait_http

pytestmark = pytest.mark.vm

WEB = "#!/bin/sh\nbusybox httpd -p 8080 -h /etc\n"


def loose_entries(root: Path) -> list[str]:
    """Everything under root that a group or other user could read, write or enter."""
    loose = []
    for path in [root, *root.rglob("*")]:
        mode = path.lstat().st_mode
        if stat.S_ISLNK(mode):
            continue
        if stat.S_IMODE(mode) & 0o077 or (stat.S_ISREG(mode) and stat.S_IMODE(mode) & 0o100):
            loose.append(f"{oct(stat.S_IMODE(mode))} {path.relative_to(root)}")
    return sorted(loose)


def test_files_are_private_after_create_snapshot_and_restore(daemon_factory) -> None:
    old_umask = os.umask(0o022)  # a permissive shell: modes must not depend on it
    try:
        hatch = daemon_factory()
        # An earlier hatchvm left world-readable files: start-up tightens them.
        stale = hatch.data_dir / "vms" / "left-behind.log"
        stale.parent.mkdir(parents=True, exist_ok=True)
        stale.write_text("old\n")
        stale.chmod(0o644)
        hatch.data_dir.chmod(0o755)
        hatch.start()
        with hatch.client(hatch.create_key("alice")) as api:
            vm = api.create_vm(user_data=WEB, mem_mib=256)
            wait_http(f"http://{vm['guest_ip']}:8080/hostname")
            assert loose_entries(hatch.data_dir) == []
            api.snapshot_vm(vm["id"], wait_stored=True)
            assert loose_entries(hatch.data_dir) == []
            api.restore_vm(vm["id"])
            wait_http(f"http://{vm['guest_ip']}:8080/hostname")
        files = [p for p in hatch.data_dir.rglob("*") if p.is_file()]
        # The probe sees what it should: the database, images, disks, memory, snapshots.
        names = {p.name for p in files}
        assert {"hatchvm.db", "rootfs.ext4", "disk.ext4", "mem"} <= names
        suffixes = {p.suffix for p in files}
        assert {".pack", ".idx", ".listing"} <= suffixes  # the snapshot's chunk store files
        assert loose_entries(hatch.data_dir) == []
        assert stat.S_IMODE(hatch.data_dir.stat().st_mode) == 0o700
    finally:
        os.umask(old_umask)


def test_the_cli_writes_a_private_database(tmp_path: Path) -> None:
    data = tmp_path / "data"
    env = {k: v for k, v in os.environ.items() if not k.startswith("HATCH_")}
    env["HATCH_DATA_DIR"] = str(data)
    subprocess.run(
        ["sh", "-c", 'umask 022 && exec "$@"', "sh", sys.executable, "-m", "hatchvm.cli.main",
         "keys", "create", "--user", "me"],
        env=env, check=True, capture_output=True, timeout=60,
    )  # fmt: skip
    assert (data / "hatchvm.db").exists()
    assert loose_entries(data) == []
