"""The default guest image for tests: built once into a cache and hard-linked into data dirs."""

from __future__ import annotations

import asyncio
import hashlib
import json
import os
import shutil
import subprocess
import time
from pathlib import Path
from typing import Any

from hatchvm.db.engine import make_engine, make_sessionmaker
from hatchvm.images.builder import (
    AGENT_PATH,
    BUILDER_VERSION,
    MANIFEST,
    ImageArtifacts,
    build_default_image,
    current_artifacts,
    guest_sources_hash,
    install_version,
    load_artifacts,
    prune_versions,
)
from hatchvm.images.registry import register

# One cache per builder version and guest sources: branches (worktrees) with different
# builders or agents on one machine would otherwise rebuild the same cache over each other.
CACHE_ROOT = Path.home() / ".cache/hatchvm"
TEST_IMAGE_DIR = Path(
    os.environ.get(
        "HATCH_TEST_IMAGE_DIR",
        str(CACHE_ROOT / f"test-image-v{BUILDER_VERSION}-{guest_sources_hash()}"),
    )
)
DEB_CACHE = CACHE_ROOT / "debs"
STALE_CACHE_DAYS = 7  # another cache (another agent's) unused this long is deleted


def ensure_test_image() -> ImageArtifacts:
    """Build the image unless the cache holds a complete one (needs the package mirror)."""
    artifacts = current_artifacts(TEST_IMAGE_DIR)
    if artifacts is None or not artifacts.up_to_date:
        artifacts = build_default_image(TEST_IMAGE_DIR, DEB_CACHE, print)
        prune_versions(TEST_IMAGE_DIR, set())  # only the current version is kept here
        if TEST_IMAGE_DIR.parent == CACHE_ROOT:  # not beside a directory named by hand
            prune_stale_caches(TEST_IMAGE_DIR, STALE_CACHE_DAYS * 86400)
    os.utime(TEST_IMAGE_DIR)  # in use: what prune_stale_caches goes by
    return artifacts


def prune_stale_caches(current: Path, max_age_s: float) -> list[Path]:
    """The other test-image caches beside current unused for max_age_s, deleted: each agent
    change leaves one (~76 MiB) behind. A cache in use elsewhere has its time refreshed."""
    now = time.time()
    stale = [
        path
        for path in current.parent.glob("test-image*")
        if path != current and path.is_dir() and now - path.stat().st_mtime > max_age_s
    ]
    for path in stale:
        shutil.rmtree(path, ignore_errors=True)
    return stale


def install_image(data_dir: Path) -> None:
    """Give a daemon's data dir img_default without copying (the base image is read-only)."""
    target = data_dir / "images" / "img_default"
    target.parent.mkdir(parents=True, exist_ok=True)
    shutil.copytree(TEST_IMAGE_DIR, target, copy_function=os.link, dirs_exist_ok=True)


def install_image_without_agent(settings: Any, image_id: str, *, says_so: bool = True) -> str:
    """image_id: img_default without the agent's binary and its inittab line (a user's own
    image, or one built by an older hatchvm), registered in the daemon's database. says_so:
    its manifest records that it has no agent (as the builder would); otherwise it does not
    say (an image from before manifests recorded it)."""
    src = current_artifacts(TEST_IMAGE_DIR)
    assert src is not None
    image_dir = settings.data_dir / "images" / image_id
    staging = image_dir / ".build"
    staging.mkdir(parents=True)
    for path in src.rootfs.parent.iterdir():
        if path != src.rootfs:
            os.link(path, staging / path.name)
    rootfs = staging / src.rootfs.name
    shutil.copyfile(src.rootfs, rootfs)
    inittab = image_dir / "inittab"
    inittab.write_text(_without_agent(src.rootfs))
    commands = f"rm /{AGENT_PATH}\nrm /etc/inittab\nwrite {inittab} /etc/inittab\n"
    subprocess.run(
        ["debugfs", "-w", "-f", "-", str(rootfs)],
        input=commands,
        text=True,
        check=True,
        capture_output=True,
    )
    manifest = json.loads((staging / MANIFEST).read_text())
    record = next(f for f in manifest["files"].values() if f["file"] == rootfs.name)
    record["sha256"] = hashlib.sha256(rootfs.read_bytes()).hexdigest()
    if says_so:
        manifest["agent"] = None
    else:
        manifest.pop("agent", None)
    (staging / MANIFEST).unlink()  # a hard link: the original stays as it is
    (staging / MANIFEST).write_text(json.dumps(manifest))
    image = load_artifacts(image_dir / install_version(image_dir, staging))
    assert image is not None

    async def add() -> None:
        engine = make_engine(settings.sqlalchemy_url)
        await register(make_sessionmaker(engine), image_id, image)
        await engine.dispose()

    asyncio.run(add())
    return image_id


def _without_agent(rootfs: Path) -> str:
    """The image's /etc/inittab without the agent's line."""
    out = subprocess.run(
        ["debugfs", "-R", "cat /etc/inittab", str(rootfs)], capture_output=True, text=True
    ).stdout
    assert "hatch-agent" in out
    return "".join(line for line in out.splitlines(True) if "hatch-agent" not in line)
