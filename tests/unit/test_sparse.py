"""sparse.py: copies of mostly-hole files (a guest's memory file, a VM's disk)."""

from __future__ import annotations

import mmap
import os
from pathlib import Path

import pytest

from hatchvm.sparse import copy_sparse, make_holes


def test_copy_sparse_keeps_bytes_and_holes_and_is_private(tmp_path: Path) -> None:
    src = tmp_path / "src"
    with src.open("wb") as f:
        f.truncate(64 << 20)
        os.pwrite(f.fileno(), b"x" * 4096, 8 << 20)
        os.pwrite(f.fileno(), b"y" * 100, (64 << 20) - 100)  # data up to the very end
    src.chmod(0o644)
    dest = tmp_path / "dest"
    copy_sparse(src, dest)
    assert dest.read_bytes() == src.read_bytes()
    assert dest.stat().st_blocks * 512 <= 1 << 20  # the holes stayed holes
    assert dest.stat().st_mode & 0o777 == 0o600  # a guest's files are hatchd's alone


def test_copy_into_fills_the_same_file_that_a_private_mapping_already_sees(
    tmp_path: Path,
) -> None:
    """A fork's child maps the frozen memory (privately) before the parent is copied into it:
    the copy must land in that very file, and the mapping must see it."""
    size = 16 << 20
    src = tmp_path / "src"
    with src.open("wb") as f:
        f.truncate(size)
        os.pwrite(f.fileno(), b"parent" * 1000, 3 << 20)
    dest = tmp_path / "dest"
    make_holes(dest, size)
    inode = dest.stat().st_ino
    with dest.open("rb") as f, mmap.mmap(f.fileno(), size, mmap.MAP_PRIVATE) as mapped:
        assert mapped[3 << 20 : (3 << 20) + 6] == b"\0" * 6  # read before: still a hole
        copy_sparse(src, dest, into=True)
        assert mapped[3 << 20 : (3 << 20) + 6000] == b"parent" * 1000
    assert dest.stat().st_ino == inode and dest.read_bytes() == src.read_bytes()
    assert dest.stat().st_blocks * 512 <= 1 << 20


def test_copy_into_refuses_a_file_of_another_size(tmp_path: Path) -> None:
    src, dest = tmp_path / "src", tmp_path / "dest"
    make_holes(src, 2 << 20)
    make_holes(dest, 1 << 20)
    with pytest.raises(ValueError, match="not 2097152 bytes"):
        copy_sparse(src, dest, into=True)
    assert dest.stat().st_size == 1 << 20  # left as it was
