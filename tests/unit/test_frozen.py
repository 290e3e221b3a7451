"""snapshots/frozen.py: captured files held still by links while they are stored, and the VM's
own files unshared (copied) before a guest writes into them again."""

from __future__ import annotations

import os
from pathlib import Path

from hatchvm.snapshots.frozen import forget, freeze, frozen_files, unshare

NAMES = ("mem", "disk", "state")


def sparse_file(path: Path, size: int, pieces: dict[int, bytes]) -> Path:
    with path.open("wb") as f:
        f.truncate(size)
        for offset, data in pieces.items():
            os.pwrite(f.fileno(), data, offset)
    return path


def vm_files(tmp_path: Path) -> dict[str, Path]:
    return {
        "mem": sparse_file(tmp_path / "mem", 64 << 20, {0: b"a" * 4096, 40 << 20: b"b" * 8192}),
        "disk": sparse_file(tmp_path / "disk", 16 << 20, {1 << 20: b"disk"}),
        "state": sparse_file(tmp_path / "state", 100, {0: b"s" * 100}),
    }


def test_frozen_files_are_links_and_need_the_same_boot(tmp_path: Path) -> None:
    files = vm_files(tmp_path)
    dest = tmp_path / "storing" / "snap_1"
    freeze(files, dest, "boot-1")
    found = frozen_files(dest, NAMES, "boot-1")
    assert found is not None
    assert all(found[n].samefile(files[n]) for n in NAMES)  # no byte copied
    assert frozen_files(dest, NAMES, "boot-2") is None  # the host rebooted: RAM not trusted
    (dest / "disk").unlink()
    assert frozen_files(dest, NAMES, "boot-1") is None  # one is gone
    forget(dest)
    assert not dest.exists() and not dest.parent.exists()


def test_unshare_copies_only_files_still_linked_and_keeps_the_frozen_bytes(tmp_path: Path) -> None:
    files = vm_files(tmp_path)
    dest = tmp_path / "storing" / "snap_1"
    freeze(files, dest, "boot-1")
    before = (dest / "mem").read_bytes()
    assert unshare([files["mem"], tmp_path / "absent"]) == [files["mem"]]
    assert not files["mem"].samefile(dest / "mem")
    assert files["mem"].read_bytes() == before  # the same bytes ...
    with files["mem"].open("r+b") as f:  # ... and the guest's writes reach the copy only
        os.pwrite(f.fileno(), b"guest", 0)
    assert (dest / "mem").read_bytes() == before
    assert unshare([files["mem"]]) == []  # already its own: nothing to copy
