"""A captured snapshot's files, held still while they are stored in the background.

At capture the VM's RAM file, disk and device state are hard-linked into
<vm dir>/storing/<snapshot id>/ (no byte copied: the snapshot call stays as fast as the
capture); the background store reads those names. The VM's own names stay its hot copy, so a
wake resumes at once. But a resumed guest writes into its RAM file and disk, and a store
reading those same inodes would keep a torn snapshot whose checksums still verify: so before
a VMM runs on the VM's files again, every file still linked elsewhere is replaced by a copy of
itself (`unshare`), the guest writes into the copy, and the frozen inode stays exactly the
captured state. The copy costs only a wake that comes while a store is under way (reflinked
where the file system can, else its data extents copied in the kernel); copying at every
capture instead would cost every snapshot call that time.
"""

from __future__ import annotations

import contextlib
import os
import shutil
from pathlib import Path

from hatchvm.sparse import copy_sparse

STORING_DIR = "storing"  # in the VM's directory: one folder per snapshot being stored
CAPTURED = "captured"  # in that folder: the host's boot id at capture


def freeze(files: dict[str, Path], dest: Path, boot_id: str) -> None:
    """Link files (name -> path) into dest, then mark them complete with the boot id: the
    RAM file is never flushed, so after a host reboot it may hold stale pages."""
    shutil.rmtree(dest, ignore_errors=True)
    for attempt in (1, 2):  # another store's forget() may remove the emptied parent just then
        try:
            dest.mkdir(parents=True)
            break
        except FileNotFoundError:
            if attempt == 2:
                raise
    for name, path in files.items():
        os.link(path, dest / name)
    # Not fsynced (that took 30-45 ms here, most of the snapshot call): the mark only counts
    # in the same host boot, and within one the page cache keeps it however hatchd dies.
    (dest / CAPTURED).write_text(boot_id)


def frozen_files(dest: Path, names: tuple[str, ...], boot_id: str) -> dict[str, Path] | None:
    """The frozen files, if all are there and from this host boot; else None."""
    try:
        if (dest / CAPTURED).read_text().strip() != boot_id:
            return None
    except OSError:
        return None
    files = {name: dest / name for name in names}
    return files if all(path.is_file() for path in files.values()) else None


def linked(paths: list[Path]) -> bool:
    """Whether any of the files has another link (a store or a fork's children read it)."""
    for path in paths:
        try:
            if path.stat().st_nlink > 1:
                return True
        except FileNotFoundError:
            continue
    return False


def unshare(paths: list[Path]) -> list[Path]:
    """Replace each file that has another link (a store is reading it) by a copy of itself;
    returns the files copied."""
    copied = []
    for path in paths:
        try:
            links = path.stat().st_nlink
        except FileNotFoundError:
            continue
        if links > 1:
            tmp = path.with_name(path.name + ".unshared")
            copy_sparse(path, tmp)
            os.replace(tmp, path)
            copied.append(path)
    return copied


def forget(dest: Path) -> None:
    """Remove the frozen links (the VM's own files stay), and their folder once empty."""
    with contextlib.suppress(FileNotFoundError):
        shutil.rmtree(dest)
    with contextlib.suppress(OSError):  # not empty: another snapshot is being stored
        dest.parent.rmdir()
