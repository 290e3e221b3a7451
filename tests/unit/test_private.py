"""tighten_tree: start-up takes group and other bits off the data directory, but not off the
Firecracker jails or the access hatchd gave a running jail's uid."""

from __future__ import annotations

import stat
from pathlib import Path

from hatchvm.private import tighten_tree
from hatchvm.vmm import acl


def _mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


def test_tighten_tree_keeps_the_jails_and_acl_grants(tmp_path: Path) -> None:
    loose = tmp_path / "loose"
    loose.write_text("x")
    loose.chmod(0o644)  # the control: tightened
    granted = tmp_path / "rootfs.ext4"
    granted.write_text("x")
    granted.chmod(0o400)
    acl.grant(granted, 910_401, acl.READ)
    jails = tmp_path / "jailer"
    boot = jails / "firecracker" / "vm-a" / "root" / "boot"
    boot.mkdir(parents=True)
    boot.chmod(0o711)
    assert tighten_tree(tmp_path, (jails,)) == 1
    assert _mode(loose) == 0o600
    assert acl.users(granted) == {910_401: acl.READ}
    assert _mode(granted) == 0o440  # the mask still lets the uid read
    assert _mode(boot) == 0o711
