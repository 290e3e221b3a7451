"""hatchd's files are its own: the data directory holds every user's user_data (in the database
and on the VMs' disks), their guests' memory and disks, and snapshots. Whatever hatchd or the
`hatchvm` CLI writes there is 0600 (0700 for directories) or tighter, whatever the umask of the
shell that started them."""

from __future__ import annotations

import contextlib
import os
import stat
from collections.abc import Iterator
from pathlib import Path

PRIVATE_UMASK = 0o077


def make_private_dir(path: Path) -> None:
    path.mkdir(parents=True, exist_ok=True)
    path.chmod(0o700)


ACL_XATTR = "system.posix_acl_access"


def tighten_tree(root: Path, keep: tuple[Path, ...] = ()) -> int:
    """Take group and other bits off everything under root (files an older hatchvm wrote);
    returns how many entries changed. Left alone: symlinks, the directories in keep (the
    Firecracker jails, which jailed uids must pass through) and files with a POSIX ACL (their
    group bits are its mask: the access hatchd gave a running jail's uid)."""
    changed = 0
    skipped = {os.fspath(p) for p in keep}
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames[:] = [d for d in dirnames if os.path.join(dirpath, d) not in skipped]
        for name in (*dirnames, *filenames):
            path = os.path.join(dirpath, name)
            mode = os.lstat(path).st_mode
            if stat.S_ISLNK(mode) or not stat.S_IMODE(mode) & PRIVATE_UMASK:
                continue
            with contextlib.suppress(OSError):
                if ACL_XATTR in os.listxattr(path):
                    continue
            os.chmod(path, stat.S_IMODE(mode) & ~PRIVATE_UMASK)
            changed += 1
    return changed


@contextlib.contextmanager
def umask(mask: int) -> Iterator[None]:
    """The process umask for a block (the image builder stages guest files with 0o022)."""
    old = os.umask(mask)
    try:
        yield
    finally:
        os.umask(old)
