"""The image registry: img_default is registered from the artifacts the builder left on disk."""

from __future__ import annotations

from typing import Any

import structlog
from sqlalchemy.ext.asyncio import async_sessionmaker

from hatchvm.config import Settings
from hatchvm.db.models import Image, utcnow
from hatchvm.ids import DEFAULT_IMAGE_ID
from hatchvm.images.builder import ImageArtifacts, load_artifacts

log = structlog.get_logger("hatchvm.images")


def default_image_dir(settings: Settings) -> Any:
    return settings.images_dir / DEFAULT_IMAGE_ID


async def register(
    sessions: async_sessionmaker[Any], image_id: str, artifacts: ImageArtifacts
) -> Image:
    """Insert or update the image row so it points at these artifacts."""
    async with sessions() as session, session.begin():
        image = await session.get(Image, image_id)
        if image is None:
            image = Image(id=image_id, created_at=utcnow())
            session.add(image)
        image.kernel_path = str(artifacts.kernel)
        image.vmlinux_path = str(artifacts.vmlinux)
        image.initrd_path = str(artifacts.initrd)
        image.rootfs_path = str(artifacts.rootfs)
        image.boot_args = artifacts.boot_args
    return image


async def register_default(settings: Settings, sessions: async_sessionmaker[Any]) -> bool:
    """At start-up: register img_default if its artifacts exist. True when registered."""
    artifacts = load_artifacts(default_image_dir(settings))
    if artifacts is None:
        log.warning("img_default is not built yet; run: hatchvm image build")
        return False
    await register(sessions, DEFAULT_IMAGE_ID, artifacts)
    return True
