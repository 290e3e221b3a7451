"""Snapshots as hatchd stored them, read (and rewritten) from outside the daemon: a snapshot's
row and manifest, its files rebuilt from a local chunk store, and old-format (version 1)
snapshots made from new ones, as an older hatchd would have written them."""

from __future__ import annotations

import asyncio
import tempfile
from datetime import timedelta
from pathlib import Path
from typing import Any

from hatchvm.db import repo
from hatchvm.db.engine import make_engine, make_sessionmaker
from hatchvm.db.models import Snapshot
from hatchvm.ids import new_id
from hatchvm.snapshots import codec
from hatchvm.snapshots.chunks import ChunkStore, StoredListing
from hatchvm.snapshots.local import LocalStore
from hatchvm.snapshots.manifest import ARTIFACT_NAMES, ArtifactRecord, SnapshotManifest


async def _in_db(hatch: Any, work: Any) -> Any:
    engine = make_engine(hatch.settings().sqlalchemy_url)
    try:
        async with make_sessionmaker(engine)() as session, session.begin():
            return await work(session)
    finally:
        await engine.dispose()


def manifest_of(hatch: Any, snap_id: str) -> SnapshotManifest:
    async def work(session: Any) -> str:
        row = await repo.get_snapshot(session, snap_id)
        assert row is not None, snap_id
        return row.manifest

    return SnapshotManifest.parse(asyncio.run(_in_db(hatch, work)))


def rebuild_files(hatch: Any, snap_id: str, dest: Path) -> dict[str, Path]:
    """The snapshot's mem, disk and state files, verified, from hatchd's local store."""
    manifest = manifest_of(hatch, snap_id)
    chunks = manifest.chunks
    assert chunks is not None, "not a chunk-store snapshot"
    dest.mkdir(parents=True, exist_ok=True)
    files = {name: dest / name for name in ARTIFACT_NAMES}
    store = ChunkStore(LocalStore(hatch.data_dir / "snapshots"))
    try:
        listing = StoredListing(chunks.listing_key, chunks.listing_size, chunks.listing_sha256)
        store.restore(chunks.namespace, listing, chunks.index_hashes(), files)
    finally:
        store.close()
    return files


def make_old_format(hatch: Any, snap_id: str, copy: bool = False) -> str:
    """Rewrite a local snapshot in the old per-artifact format (one zstd file per artifact,
    manifest version 1), in place or (copy) as a new snapshot just older than it. Returns the
    old-format snapshot's id."""
    manifest = manifest_of(hatch, snap_id)
    target = new_id("snap") if copy else snap_id
    store = hatch.data_dir / "snapshots"
    folder = store / manifest.vm_id / target
    folder.mkdir(parents=True)
    records = {}
    with tempfile.TemporaryDirectory(dir=hatch.data_dir) as tmp:
        files = rebuild_files(hatch, snap_id, Path(tmp))
        for name, path in files.items():
            info = codec.encode(path, folder / f"{name}.zst")
            records[name] = ArtifactRecord(
                key=f"{manifest.vm_id}/{target}/{name}.zst",
                raw_size=info.raw_size,
                stored_size=info.stored_size,
                sha256=info.sha256,
            )
    old = SnapshotManifest(
        version=1,
        snapshot_id=target,
        vm_id=manifest.vm_id,
        mem_mib=manifest.mem_mib,
        image_id=manifest.image_id,
        image_version=manifest.image_version,
        artifacts=records,
    )
    (folder / "manifest.json").write_text(old.model_dump_json(indent=2))

    async def work(session: Any) -> None:
        row = await repo.get_snapshot(session, snap_id)
        assert row is not None
        values = {
            "size_bytes": old.stored_size,
            "storage": "local",
            "location": str(folder),
            "manifest": old.model_dump_json(),
        }
        if not copy:
            for field, value in values.items():
                setattr(row, field, value)
            return
        session.add(
            Snapshot(
                id=target,
                vm_id=row.vm_id,
                user_id=row.user_id,
                automatic=False,
                created_at=row.created_at - timedelta(microseconds=1),
                **values,
            )
        )

    asyncio.run(_in_db(hatch, work))
    return target
