"""Where snapshot artifacts live.

Two kinds of objects: whole artifacts of the old per-snapshot format (keys like
`<vm_id>/<snapshot_id>/mem.zst`, read by `fetch`) and blobs of the chunk store (packs, pack
indexes and listings under `users/<namespace>/`, written and read whole or by byte range).
The blob calls block: the chunk store runs them in its own worker threads.
"""

from __future__ import annotations

from pathlib import Path
from typing import Protocol


class ArtifactStore(Protocol):
    backend: str  # "local" or "s3", shown in the API

    def location(self, prefix: str) -> str:
        """Where a snapshot's artifacts are, for people (a path or an s3:// URL)."""
        ...

    async def put(self, key: str, path: Path) -> None:
        """Store the file at path under key. The file may be moved or removed."""
        ...

    async def fetch(self, key: str, workdir: Path) -> Path:
        """A local path with the artifact's bytes (inside workdir unless already local).
        Raises ArtifactMissing."""
        ...

    async def delete_prefix(self, prefix: str) -> None:
        """Remove every artifact under prefix. Idempotent."""
        ...

    def write_blob(self, key: str, data: bytes) -> None:
        """Store data under key, durably once this returns (never seen half-written)."""
        ...

    def read_blob(self, key: str, start: int = 0, length: int | None = None) -> bytes:
        """The blob's bytes from start (length of them, or to the end). Raises
        ArtifactMissing."""
        ...

    def list_blobs(self, prefix: str) -> list[tuple[str, int]]:
        """Every blob under prefix, as (key, size)."""
        ...

    def delete_blobs(self, keys: list[str]) -> None:
        """Remove these blobs; absent ones are fine."""
        ...
