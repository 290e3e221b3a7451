"""The versioned description of one snapshot: its artifacts with sizes and checksums."""

from __future__ import annotations

from pydantic import BaseModel, ConfigDict, ValidationError

from hatchvm.snapshots.codec import ArtifactInfo
from hatchvm.snapshots.errors import ArtifactCorrupt

MANIFEST_VERSION = 1
# mem: guest RAM; disk: the VM's writable disk; state: QEMU's device state (no RAM).
ARTIFACT_NAMES = ("mem", "disk", "state")


class ArtifactRecord(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    key: str
    raw_size: int
    stored_size: int
    sha256: str

    def info(self) -> ArtifactInfo:
        return ArtifactInfo(self.raw_size, self.stored_size, self.sha256)


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

    @property
    def stored_size(self) -> int:
        return sum(a.stored_size for a in self.artifacts.values())

    @classmethod
    def parse(cls, text: str) -> SnapshotManifest:
        try:
            manifest = cls.model_validate_json(text)
        except ValidationError as exc:
            raise ArtifactCorrupt(f"unreadable manifest: {exc.error_count()} errors") from None
        if manifest.version != MANIFEST_VERSION:
            raise ArtifactCorrupt(f"manifest version {manifest.version} is not supported")
        if set(manifest.artifacts) != set(ARTIFACT_NAMES):
            raise ArtifactCorrupt(f"manifest lists {sorted(manifest.artifacts)}")
        return manifest
