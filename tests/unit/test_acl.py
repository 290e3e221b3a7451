"""Per-uid access through POSIX ACLs (vmm/acl.py): what a jailed Firecracker's uid may do with a
file hatchd links into its jail, and that taking it away leaves the file as it was."""

from __future__ import annotations

import os
import shutil
import stat
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest

from hatchvm.vmm import acl

UID_A, UID_B = 910_101, 910_102


@pytest.fixture
def image() -> Iterator[Path]:
    # A directory other uids may pass through (pytest's tmp_path is root's alone).
    where = Path(tempfile.mkdtemp(prefix="hvacl-", dir="/tmp"))
    where.chmod(0o711)
    path = where / "rootfs.ext4"
    path.write_text("base image")
    path.chmod(0o400)
    yield path
    shutil.rmtree(where)


def _as_uid(uid: int, path: Path, mode: int) -> str:
    """What uid gets opening path with mode: 'ok' or the error's name (a child process)."""
    read, write = os.pipe()
    pid = os.fork()
    if pid == 0:  # pragma: no cover - the child
        os.close(read)
        try:
            os.setgroups([])
            os.setgid(uid)
            os.setuid(uid)
            os.close(os.open(path, mode))
            os.write(write, b"ok")
        except OSError as exc:
            os.write(write, type(exc).__name__.encode())
        os._exit(0)
    os.close(write)
    os.waitpid(pid, 0)
    with os.fdopen(read) as answer:
        return answer.read()


def test_a_grant_gives_one_uid_read_access_and_revoke_takes_it_back(image: Path) -> None:
    acl.grant(image, UID_A, acl.READ)
    assert acl.users(image) == {UID_A: acl.READ}
    assert os.stat(image).st_uid == os.geteuid()
    acl.grant(image, UID_B, acl.READ | acl.WRITE)
    assert acl.users(image) == {UID_A: acl.READ, UID_B: acl.READ | acl.WRITE}
    acl.revoke(image, UID_B)
    acl.revoke(image, UID_B)  # idempotent
    assert acl.users(image) == {UID_A: acl.READ}
    acl.revoke(image, UID_A)
    assert acl.users(image) == {}
    assert acl.XATTR not in os.listxattr(image)
    assert stat.S_IMODE(os.stat(image).st_mode) == 0o400  # exactly as it was


@pytest.mark.skipif(os.geteuid() != 0, reason="switching uid needs root")
def test_the_uid_reads_what_it_was_granted_and_nothing_more(image: Path) -> None:
    assert _as_uid(UID_A, image, os.O_RDONLY) == "PermissionError"  # the control
    acl.grant(image, UID_A, acl.READ)
    assert _as_uid(UID_A, image, os.O_RDONLY) == "ok"
    assert _as_uid(UID_A, image, os.O_RDWR) == "PermissionError"  # read-only stays read-only
    assert _as_uid(UID_B, image, os.O_RDONLY) == "PermissionError"  # another VM's uid
    acl.grant(image, UID_B, acl.READ | acl.WRITE)
    assert _as_uid(UID_B, image, os.O_RDWR) == "ok"
    acl.revoke(image, UID_A)
    assert _as_uid(UID_A, image, os.O_RDONLY) == "PermissionError"
    assert _as_uid(UID_B, image, os.O_RDWR) == "ok"  # the other grant is untouched


def test_a_symlink_or_a_missing_file_is_never_followed(image: Path, tmp_path: Path) -> None:
    link = tmp_path / "link"
    link.symlink_to(image)
    with pytest.raises(acl.ACLError, match="cannot open"):
        acl.grant(link, UID_A, acl.READ)
    assert acl.users(image) == {}
    acl.revoke(tmp_path / "missing", UID_A)  # nothing to revoke: no error
    with pytest.raises(acl.ACLError, match="not a regular file"):
        acl.grant(tmp_path, UID_A, acl.READ)
