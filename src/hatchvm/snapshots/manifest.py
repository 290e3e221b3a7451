"""The versioned description of one snapshot, kept in its database row.

Version 1 (the old format): one zstd file per artifact, each with its key, sizes and sha256.
Version 2 (the chunk store): the artifacts' summaries, the key and sha256 of the chunk
listing, and every pack the listing's chunks are in (with its size, for the quota).
"""

from __future__ import annotations

import json
from collections.abc import Iterable

from pydantic import BaseModel, ConfigDict, ValidationError

from hatchvm.snapshots.codec import ArtifactInfo
from hatchvm.snapshots.errors import ArtifactCorrupt

MANIFEST_VERSION = 2
VERSIONS = (1, 2)
# mem: guest RAM; disk: the VM's writable disk; state: QEMU's device state (no RAM).
ARTIFACT_NAMES = ("mem", "disk", "state")


class ArtifactRecord(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    key: str | None = None  # version 1 only: the artifact's own file
    raw_size: int
    # v1: the compressed file; v2: the compressed blocks a restore of it reads.
    stored_size: int
    # v1: of the compressed file; v2: of its chunk listing (raw size, page numbers, names).
    sha256: str

    def info(self) -> ArtifactInfo:
        return ArtifactInfo(self.raw_size, self.stored_size, self.sha256)


class PackRecord(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    size: int  # bytes stored: the pack and its index
    index_sha256: str  # of its index, which holds the sha256 of every block


class ChunkRecord(BaseModel):
    """Where a version-2 snapshot's chunks are."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    namespace: str
    listing_key: str
    listing_size: int
    listing_sha256: str
    packs: dict[str, PackRecord]  # every pack its chunks are in
    added_bytes: int  # what it added to the store: new packs and its listing

    def index_hashes(self) -> dict[str, str]:
        return {pack: record.index_sha256 for pack, record in self.packs.items()}


class SnapshotManifest(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    version: int = MANIFEST_VERSION
    snapshot_id: str
    vm_id: str
    mem_mib: int
    # The image the guest runs on: its files must be exactly these when the snapshot resumes.
    image_id: str | None = None
    image_version: str | None = None
    artifacts: dict[str, ArtifactRecord]
    chunks: ChunkRecord | None = None  # version 2

    @property
    def stored_size(self) -> int:
        return sum(a.stored_size for a in self.artifacts.values())

    @classmethod
    def parse(cls, text: str) -> SnapshotManifest:
        try:
            manifest = cls.model_validate_json(text)
        except ValidationError as exc:
            raise ArtifactCorrupt(f"unreadable manifest: {exc.error_count()} errors") from None
        if manifest.version not in VERSIONS:
            raise ArtifactCorrupt(f"manifest version {manifest.version} is not supported")
        if set(manifest.artifacts) != set(ARTIFACT_NAMES):
            raise ArtifactCorrupt(f"manifest lists {sorted(manifest.artifacts)}")
        if (manifest.version == 2) != (manifest.chunks is not None):
            raise ArtifactCorrupt(f"manifest version {manifest.version} without its chunks")
        return manifest


def unique_bytes(rows: Iterable[tuple[int, str]]) -> int:
    """What a user's snapshots hold in the store, from their rows' (size_bytes, manifest):
    every pack once, every listing, and old-format snapshots by their own size."""
    packs: dict[str, int] = {}
    total = 0
    for size, text in rows:
        try:
            chunks = json.loads(text).get("chunks")
        except (ValueError, AttributeError):
            chunks = None
        if not isinstance(chunks, dict):
            total += size
            continue
        for pack, record in (chunks.get("packs") or {}).items():
            packs[pack] = int(record["size"])
        total += int(chunks.get("listing_size") or 0)
    return total + sum(packs.values())
