"""/images: the registered guest images."""

from __future__ import annotations

from fastapi import APIRouter

from hatchvm.api.deps import Svc, User
from hatchvm.api.openapi import AUTHENTICATED, errors
from hatchvm.api.outputs import Image, render_image
from hatchvm.db import repo
from hatchvm.errors import NotFound

router = APIRouter(prefix="/images", tags=["images"], responses=errors(*AUTHENTICATED))


@router.get("")
async def list_images(user: User, svc: Svc) -> list[Image]:
    async with svc.sessions() as session:
        return [render_image(i) for i in await repo.list_images(session)]


@router.get("/{image_id}", responses=errors(404))
async def get_image(image_id: str, user: User, svc: Svc) -> Image:
    async with svc.sessions() as session:
        image = await repo.get_image(session, image_id)
    if image is None:
        raise NotFound(f"image {image_id} not found")
    return render_image(image)
