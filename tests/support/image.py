"""The default guest image for tests: built once into a cache and hard-linked into data dirs."""

from __future__ import annotations

import os
import shutil
from pathlib import Path

from hatchvm.images.builder import (
    BUILDER_VERSION,
    ImageArtifacts,
    build_default_image,
    current_artifacts,
    prune_versions,
)

# One cache per builder version: branches (worktrees) with different builders on one machine
# would otherwise rebuild the same cache over each other.
TEST_IMAGE_DIR = Path(
    os.environ.get(
        "HATCH_TEST_IMAGE_DIR", str(Path.home() / f".cache/hatchvm/test-image-v{BUILDER_VERSION}")
    )
)
DEB_CACHE = Path.home() / ".cache/hatchvm/debs"


def ensure_test_image() -> ImageArtifacts:
    """Build the image unless the cache holds a complete one (needs the package mirror)."""
    artifacts = current_artifacts(TEST_IMAGE_DIR)
    if artifacts is None or not artifacts.up_to_date:
        artifacts = build_default_image(TEST_IMAGE_DIR, DEB_CACHE, print)
        prune_versions(TEST_IMAGE_DIR, set())  # only the current version is kept here
    return artifacts


def install_image(data_dir: Path) -> None:
    """Give a daemon's data dir img_default without copying (the base image is read-only)."""
    target = data_dir / "images" / "img_default"
    target.parent.mkdir(parents=True, exist_ok=True)
    shutil.copytree(TEST_IMAGE_DIR, target, copy_function=os.link, dirs_exist_ok=True)
