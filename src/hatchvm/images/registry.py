"""The image registry: img_default is registered from the current version the builder left on
disk; each VM pins the version it was created with (images/<id>/<version>/), and versions
nothing pins any more are removed."""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import Any

import structlog
from sqlalchemy import select
from sqlalchemy.ext.asyncio import async_sessionmaker

from hatchvm.config import Settings
from hatchvm.db.models import VM, Image, utcnow
from hatchvm.ids import DEFAULT_IMAGE_ID
from hatchvm.images.builder import (
    ImageArtifacts,
    current_artifacts,
    load_artifacts,
    prune_versions,
)

log = structlog.get_logger("hatchvm.images")


def image_dir(settings: Settings, image_id: str = DEFAULT_IMAGE_ID) -> Path:
    return settings.images_dir / image_id


def default_image_dir(settings: Settings) -> Path:
    return image_dir(settings)


def pinned_artifacts(settings: Settings, image_id: str, version: str) -> ImageArtifacts | None:
    """The files of one version of an image (None if they are gone)."""
    return load_artifacts(image_dir(settings, image_id) / version)


async def register(
    sessions: async_sessionmaker[Any], image_id: str, artifacts: ImageArtifacts
) -> Image:
    """Insert or update the image row so it points at these artifacts (its current version);
    VMs made before versions existed pin the version they have been using."""
    async with sessions() as session, session.begin():
        image = await session.get(Image, image_id)
        if image is None:
            image = Image(id=image_id, created_at=utcnow())
            session.add(image)
        previous = image.version
        image.kernel_path = str(artifacts.kernel)
        image.vmlinux_path = str(artifacts.vmlinux)
        image.initrd_path = str(artifacts.initrd)
        image.rootfs_path = str(artifacts.rootfs)
        image.boot_args = artifacts.boot_args
        image.version = artifacts.version
        unpinned = await session.scalars(
            select(VM).where(VM.image_id == image_id, VM.image_version.is_(None))
        )
        for vm in unpinned:
            vm.image_version = previous or artifacts.version
    return image


async def register_default(settings: Settings, sessions: async_sessionmaker[Any]) -> bool:
    """At start-up: register img_default if a version of it exists. True when registered."""
    artifacts = await asyncio.to_thread(current_artifacts, default_image_dir(settings))
    if artifacts is None:
        log.warning("img_default is not built yet; run: hatchvm image build")
        return False
    await register(sessions, DEFAULT_IMAGE_ID, artifacts)
    return True


async def prune(settings: Settings, sessions: async_sessionmaker[Any]) -> None:
    """Remove the image versions no VM pins (nor is current). Only the daemon prunes: it
    alone creates VMs, so no VM can pin a version while it is being removed."""
    async with sessions() as session:
        rows = (await session.execute(select(VM.image_id, VM.image_version))).all()
    pinned: dict[str, set[str]] = {}
    for image_id, version in rows:
        if version:
            pinned.setdefault(image_id, set()).add(version)
    for directory in settings.images_dir.iterdir() if settings.images_dir.is_dir() else []:
        gone = await asyncio.to_thread(prune_versions, directory, pinned.get(directory.name, set()))
        if gone:
            log.info("image versions no vm uses removed", image_id=directory.name, versions=gone)
