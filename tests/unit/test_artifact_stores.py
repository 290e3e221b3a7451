"""The local artifact store and the manifest: keys stay inside the store, bad manifests are
refused as corrupt, deleting a prefix removes exactly that prefix."""

from __future__ import annotations

import asyncio
import json
from pathlib import Path

import pytest

from hatchvm.snapshots.errors import ArtifactCorrupt, ArtifactError, ArtifactMissing
from hatchvm.snapshots.local import LocalStore
from hatchvm.snapshots.manifest import ArtifactRecord, SnapshotManifest, unique_bytes


def test_put_fetch_delete(tmp_path: Path) -> None:
    store = LocalStore(tmp_path / "store")
    for name in ("a", "b"):
        src = tmp_path / f"{name}.zst"
        src.write_bytes(name.encode() * 10)
        asyncio.run(store.put(f"vm_1/snap_{name}/mem.zst", src))
        assert not src.exists()  # moved, not copied
    got = asyncio.run(store.fetch("vm_1/snap_a/mem.zst", tmp_path))
    assert got.read_bytes() == b"a" * 10
    asyncio.run(store.delete_prefix("vm_1/snap_a"))
    with pytest.raises(ArtifactMissing):
        asyncio.run(store.fetch("vm_1/snap_a/mem.zst", tmp_path))
    assert asyncio.run(store.fetch("vm_1/snap_b/mem.zst", tmp_path)).exists()
    assert store.location("vm_1/snap_b") == str((tmp_path / "store/vm_1/snap_b").resolve())


def test_keys_cannot_leave_the_store(tmp_path: Path) -> None:
    store = LocalStore(tmp_path / "store")
    src = tmp_path / "x"
    src.write_bytes(b"x")
    with pytest.raises(ArtifactError, match="leaves the store"):
        asyncio.run(store.put("../outside", src))
    with pytest.raises(ArtifactError, match="leaves the store"):
        asyncio.run(store.delete_prefix("../../"))
    assert src.exists()


def _manifest(**changes: object) -> str:
    record = ArtifactRecord(key="k", raw_size=1, stored_size=1, sha256="0" * 64)
    data = SnapshotManifest(
        version=1,  # the old format: one file per artifact
        snapshot_id="snap_1",
        vm_id="vm_1",
        mem_mib=128,
        artifacts={n: record for n in ("mem", "disk", "state")},
    ).model_dump()
    data.update(changes)
    return SnapshotManifest.model_validate(data).model_dump_json()


def test_manifest_round_trip_and_refusals() -> None:
    assert SnapshotManifest.parse(_manifest()).stored_size == 3
    with pytest.raises(ArtifactCorrupt, match="unreadable manifest"):
        SnapshotManifest.parse("{not json")
    with pytest.raises(ArtifactCorrupt, match="version 3"):
        SnapshotManifest.parse(_manifest(version=3))
    with pytest.raises(ArtifactCorrupt, match="version 2 without its chunks"):
        SnapshotManifest.parse(_manifest(version=2))
    with pytest.raises(ArtifactCorrupt, match="lists"):
        SnapshotManifest.parse(_manifest(artifacts={}))


def test_unique_bytes_counts_each_pack_once() -> None:
    def v2(packs: dict[str, int], listing: int) -> str:
        chunks = {
            "namespace": "u1",
            "listing_key": "k",
            "listing_size": listing,
            "listing_sha256": "0" * 64,
            "packs": {p: {"size": n, "index_sha256": "0" * 64} for p, n in packs.items()},
            "added_bytes": 0,
        }
        return json.dumps({"version": 2, "chunks": chunks})

    rows = [
        (999, v2({"a": 100, "b": 50}, 7)),  # size_bytes does not count for chunk snapshots
        (999, v2({"b": 50, "c": 20}, 5)),  # b is shared: counted once
        (300, _manifest()),  # an old-format snapshot counts whole
        (40, "not json"),
    ]
    assert unique_bytes(rows) == 100 + 50 + 20 + 7 + 5 + 300 + 40
