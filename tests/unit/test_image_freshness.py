"""An image counts as up to date only when this builder made it from these guest sources: a
changed agent or init script without a BUILDER_VERSION bump is rebuilt, never silently run in
its old form (images/builder.py)."""

from __future__ import annotations

import json
import os
import shutil
import time
from importlib import resources
from pathlib import Path

from hatchvm.images.builder import BUILDER_VERSION, guest_sources_hash, load_artifacts
from tests.support.image import prune_stale_caches
from tests.unit.core_on_fake import placeholder_build


def copy_of_guest_sources(tmp_path: Path) -> Path:
    root = tmp_path / "guest"
    source = resources.files("hatchvm.images").joinpath("guest")
    with resources.as_file(source) as path:
        shutil.copytree(path, root, ignore=shutil.ignore_patterns("__pycache__"))
    return root


def test_the_hash_follows_every_guest_file_and_nothing_else(tmp_path: Path) -> None:
    root = copy_of_guest_sources(tmp_path)
    shipped = guest_sources_hash()
    assert guest_sources_hash(root) == shipped, "a faithful copy hashes the same"

    agent = root / "agent" / "hatch-agent.c"
    original = agent.read_bytes()
    agent.write_bytes(original.replace(b"hatch-agent", b"hatch-agenT", 1))
    assert guest_sources_hash(root) != shipped, "an edit of the agent"
    agent.write_bytes(original)
    assert guest_sources_hash(root) == shipped

    (root / "inittab").rename(root / "inittab.old")
    assert guest_sources_hash(root) != shipped, "a renamed file"
    (root / "inittab.old").rename(root / "inittab")
    (root / "agent" / "notes.txt").write_text("new\n")
    assert guest_sources_hash(root) != shipped, "a new file"


def built_image(tmp_path: Path, **fields: object) -> Path:
    out = tmp_path / "image"
    placeholder_build(out, **fields)
    return out


def test_an_image_of_these_sources_and_this_builder_is_up_to_date(tmp_path: Path) -> None:
    artifacts = load_artifacts(built_image(tmp_path, guest_sources=guest_sources_hash()))
    assert artifacts is not None and artifacts.up_to_date


def test_an_image_of_other_sources_is_rebuilt(tmp_path: Path) -> None:
    artifacts = load_artifacts(built_image(tmp_path, guest_sources="0123456789abcdef"))
    assert artifacts is not None and not artifacts.up_to_date


def test_an_image_that_does_not_say_its_sources_is_rebuilt(tmp_path: Path) -> None:
    artifacts = load_artifacts(built_image(tmp_path))  # built before manifests kept them
    assert artifacts is not None and not artifacts.up_to_date


def test_an_image_of_another_builder_is_rebuilt(tmp_path: Path) -> None:
    made = built_image(tmp_path, guest_sources=guest_sources_hash())
    manifest = json.loads((made / "manifest.json").read_text())
    manifest["builder_version"] = BUILDER_VERSION - 1
    (made / "manifest.json").write_text(json.dumps(manifest))
    artifacts = load_artifacts(made)
    assert artifacts is not None and not artifacts.up_to_date


def test_only_stale_test_image_caches_are_pruned(tmp_path: Path) -> None:
    current = tmp_path / "test-image-v9-new"
    kept = [current, tmp_path / "test-image-v9-recent", tmp_path / "debs"]
    stale = [tmp_path / "test-image-v8", tmp_path / "test-image-v9-old"]
    old = time.time() - 8 * 86400
    for path in [*kept, *stale]:
        (path / "version").mkdir(parents=True)
    for path in [*stale, tmp_path / "debs", current]:
        os.utime(path, (old, old))  # the current one and the deb cache however old

    assert sorted(prune_stale_caches(current, 7 * 86400)) == sorted(stale)
    assert [p for p in kept if p.exists()] == kept
    assert not any(p.exists() for p in stale)
