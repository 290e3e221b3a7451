"""Artifacts in a directory under HATCH_DATA_DIR (the embedded default)."""

from __future__ import annotations

import asyncio
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
