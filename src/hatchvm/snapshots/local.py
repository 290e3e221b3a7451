"""Artifacts in a directory under HATCH_DATA_DIR (the embedded default)."""

from __future__ import annotations

import asyncio
import contextlib
import os
import shutil
from pathlib import Path

from hatchvm.snapshots.errors import ArtifactError, ArtifactMissing


class LocalStore:
    backend = "local"

    def __init__(self, root: Path) -> None:
        self.root = root.resolve()

    def _path(self, key: str) -> Path:
        path = (self.root / key).resolve()
        if not path.is_relative_to(self.root):
            raise ArtifactError(f"artifact key {key!r} leaves the store")
        return path

    def location(self, prefix: str) -> str:
        return str(self._path(prefix))

    async def put(self, key: str, path: Path) -> None:
        await asyncio.to_thread(self._put, key, path)

    def _put(self, key: str, path: Path) -> None:
        dest = self._path(key)
        dest.parent.mkdir(parents=True, exist_ok=True)
        try:
            os.replace(path, dest)  # same file system: a rename
        except OSError:
            tmp = dest.with_name(dest.name + ".tmp")
            shutil.copyfile(path, tmp)
            os.replace(tmp, dest)
            path.unlink()
        fd = os.open(dest.parent, os.O_RDONLY)
        try:
            os.fsync(fd)  # the rename itself must survive a crash
        finally:
            os.close(fd)

    async def fetch(self, key: str, workdir: Path) -> Path:
        path = self._path(key)
        if not path.is_file():
            raise ArtifactMissing(f"{key} is missing")
        return path

    async def delete_prefix(self, prefix: str) -> None:
        await asyncio.to_thread(shutil.rmtree, self._path(prefix), True)

    # ---- blobs (the chunk store) -------------------------------------------------------

    def write_blob(self, key: str, data: bytes) -> None:
        dest = self._path(key)
        tmp = dest.with_name(dest.name + ".tmp")
        for attempt in (1, 2):  # the collector may remove an emptied folder just then
            dest.parent.mkdir(parents=True, exist_ok=True)
            try:
                f = tmp.open("wb")
                break
            except FileNotFoundError:
                if attempt == 2:
                    raise
        with f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, dest)
        _fsync_dir(dest.parent)

    def read_blob(self, key: str, start: int = 0, length: int | None = None) -> bytes:
        try:
            with self._path(key).open("rb") as f:
                if length is None:
                    f.seek(start)
                    return f.read()
                return os.pread(f.fileno(), length, start)
        except FileNotFoundError:
            raise ArtifactMissing(f"{key} is missing") from None

    def list_blobs(self, prefix: str) -> list[tuple[str, int]]:
        top = self._path(prefix)
        if not top.is_dir():
            return []
        return [
            (str(path.relative_to(self.root)), path.stat().st_size)
            for path in top.rglob("*")
            if path.is_file()  # a .tmp left by a crash too: the collector removes it
        ]

    def delete_blobs(self, keys: list[str]) -> None:
        parents = set()
        for key in keys:
            path = self._path(key)
            path.unlink(missing_ok=True)
            parents.add(path.parent)
        for parent in parents:
            if parent.is_dir():
                _fsync_dir(parent)
                with contextlib.suppress(OSError):  # a VM's listings folder, once empty
                    parent.rmdir()


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)  # a rename or unlink must itself survive a crash
    finally:
        os.close(fd)
