"""Errors of snapshot artifacts, translated from OS, zstd and S3 errors at this package's edge."""

from __future__ import annotations


class ArtifactError(Exception):
    """An artifact is missing, corrupt or could not be read or written."""


class ArtifactMissing(ArtifactError):
    pass


class ArtifactCorrupt(ArtifactError):
    pass


class StoreStopped(ArtifactError):
    """A store called off before it finished (its snapshot or VM is being deleted)."""
