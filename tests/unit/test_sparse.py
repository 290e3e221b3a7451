"""sparse.py: copies of mostly-hole files (a guest's memory file, a VM's disk)."""

from __future__ import annotations

import os
from pathlib import Path

from hatchvm.sparse import copy_sparse


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
