"""Where snapshot artifacts live. Keys look like `<vm_id>/<snapshot_id>/<name>`."""

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
