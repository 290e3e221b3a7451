"""The chunk store on a local directory: exact sparse round trips, each page stored once
(within a file, across files and snapshots of one namespace), zero pages free, damage
refused, and the collector deleting exactly what nothing names."""

from __future__ import annotations

import asyncio
import hashlib
from collections.abc import Iterator
from pathlib import Path

import pytest

from hatchvm.snapshots.chunks import (
    ChunkStore,
    StoredListing,
    Written,
    listing_key,
    namespace,
    pack_key,
)
from hatchvm.snapshots.errors import ArtifactCorrupt, ArtifactMissing
from hatchvm.snapshots.formats import PAGE
from hatchvm.snapshots.gc import Collector, Committed
from hatchvm.snapshots.local import LocalStore
from hatchvm.snapshots.manifest import PackRecord

MIB = 1 << 20


def page(seed: str, i: int) -> bytes:
    """A distinct, poorly compressible page."""
    return b"".join(hashlib.sha256(f"{seed}/{i}/{j}".encode()).digest() for j in range(128))


def memory_file(path: Path, seed: str, pages: int = 300, size: int = 16 * MIB) -> bytes:
    """A hole, distinct pages, zero pages, text, a hole, a short last page."""
    with path.open("wb") as f:
        f.truncate(size)
        f.seek(MIB)
        f.write(b"".join(page(seed, i) for i in range(pages)))
        f.write(bytes(8 * PAGE))
        f.write(b"hello world " * 5000)
    with path.open("ab") as f:
        f.write(b"end marker")  # size is no longer a multiple of the page size
    return path.read_bytes()


@pytest.fixture
def store(tmp_path: Path) -> Iterator[ChunkStore]:
    chunks = ChunkStore(LocalStore(tmp_path / "store"))
    yield chunks
    chunks.close()


def put(
    store: ChunkStore, ns: str, snap: str, files: dict[str, Path], committed: dict[str, str]
) -> tuple[Written, StoredListing]:
    pins: set[str] = set()
    written = store.write_chunks(ns, files, store.known(ns, committed), pins)
    assert set(written.new_packs) <= pins  # pinned before they were written
    return written, store.write_listing(listing_key(ns, "vm_1", snap), written)


def get(
    store: ChunkStore, ns: str, written: Written, listing: StoredListing, out: Path
) -> dict[str, bytes]:
    out.mkdir(exist_ok=True)
    dests = {name: out / name for name in written.listings}
    store.restore(ns, listing, hashes(store, ns, written), dests)
    return {name: path.read_bytes() for name, path in dests.items()}


def hashes(store: ChunkStore, ns: str, written: Written) -> dict[str, str]:
    """Each pack's index sha256, as a snapshot's row records them."""
    return {
        p: hashlib.sha256(store.blobs.read_blob(f"users/{ns}/packs/{p}.idx")).hexdigest()
        for p in written.packs
    }


def stored(tmp_path: Path) -> int:
    return sum(p.stat().st_size for p in (tmp_path / "store").rglob("*.pack"))


def test_round_trip_is_exact_and_sparse(store: ChunkStore, tmp_path: Path) -> None:
    ns = namespace("alice")
    original = memory_file(tmp_path / "mem", "a")
    (tmp_path / "state").write_bytes(b"device state")
    files = {"mem": tmp_path / "mem", "state": tmp_path / "state"}
    written, listing = put(store, ns, "snap_1", files, {})
    assert written.artifacts["mem"].raw_size == len(original)
    # 300 random pages (incompressible) and some text; zeros and holes cost nothing.
    assert 300 * PAGE < stored(tmp_path) < 300 * PAGE + 64 << 10
    got = get(store, ns, written, listing, tmp_path / "out")
    assert got == {"mem": original, "state": b"device state"}
    assert (tmp_path / "out/mem").stat().st_blocks * 512 < 2 * MIB  # holes stay holes


def test_pages_are_stored_once_per_namespace(store: ChunkStore, tmp_path: Path) -> None:
    ns = namespace("alice")
    memory_file(tmp_path / "a", "a")
    first, _ = put(store, ns, "snap_1", {"mem": tmp_path / "a"}, {})
    size = stored(tmp_path)
    # The same pages again, moved by a page and with a few new ones: only those are added.
    with (tmp_path / "b").open("wb") as f:
        f.write(b"".join(page("a", i) for i in range(300)) + page("new", 1) + page("new", 2))
    committed = {p: info.index_sha256 for p, info in first.new_packs.items()}
    second, listing = put(store, ns, "snap_2", {"mem": tmp_path / "b"}, committed)
    assert 0 < stored(tmp_path) - size < 3 * PAGE
    assert set(first.new_packs) <= set(second.packs)  # it names the first one's packs
    got = get(store, ns, second, listing, tmp_path / "out")
    assert got["mem"] == (tmp_path / "b").read_bytes()
    # Another namespace shares nothing: it stores every page itself.
    other, _ = put(store, namespace("bob"), "snap_3", {"mem": tmp_path / "a"}, {})
    assert not set(other.packs) & set(first.packs)
    assert stored(tmp_path) > 2 * size - (64 << 10)


def test_shared_bytes_are_the_pages_named_but_not_written(
    store: ChunkStore, tmp_path: Path
) -> None:
    """What hatch_snapshot_bytes_deduplicated_total counts: pages already in the user's store
    or earlier in the same files, uncompressed; zero pages are no chunk at all."""
    ns = namespace("alice")
    distinct = b"".join(page("a", i) for i in range(10))
    (tmp_path / "a").write_bytes(distinct + page("a", 2) + bytes(PAGE) + b"tail")
    first, _ = put(store, ns, "snap_1", {"mem": tmp_path / "a"}, {})
    assert first.shared_bytes == PAGE  # the repeated page
    (tmp_path / "b").write_bytes(distinct + page("new", 1))
    committed = {p: info.index_sha256 for p, info in first.new_packs.items()}
    files = {"mem": tmp_path / "b", "disk": tmp_path / "a"}
    second, _ = put(store, ns, "snap_2", files, committed)
    assert second.shared_bytes == 10 * PAGE + (11 * PAGE + len(b"tail"))  # all but page new/1
    other, _ = put(store, namespace("bob"), "snap_3", {"mem": tmp_path / "b"}, {})
    assert other.shared_bytes == 0  # never shared across users


def test_a_damaged_chunk_or_missing_pack_is_refused(store: ChunkStore, tmp_path: Path) -> None:
    ns = namespace("alice")
    memory_file(tmp_path / "mem", "a")
    written, listing = put(store, ns, "snap_1", {"mem": tmp_path / "mem"}, {})
    [pack] = written.packs
    path = tmp_path / "store" / pack_key(ns, pack)
    good = path.read_bytes()
    damaged = bytearray(good)
    damaged[len(damaged) // 2] ^= 0xFF
    path.write_bytes(bytes(damaged))
    with pytest.raises(ArtifactCorrupt, match=f"pack {pack} (is corrupt|fails its checksum)"):
        get(store, ns, written, listing, tmp_path / "out")
    path.unlink()
    with pytest.raises(ArtifactMissing, match=f"pack {pack} is missing"):
        get(store, ns, written, listing, tmp_path / "out")
    path.write_bytes(good)
    assert (
        get(store, ns, written, listing, tmp_path / "out")["mem"] == (tmp_path / "mem").read_bytes()
    )
    bad = StoredListing(listing.key, listing.size, "0" * 64)
    with pytest.raises(ArtifactCorrupt, match="listing fails its sha256"):
        store.restore(ns, bad, hashes(store, ns, written), {"mem": tmp_path / "out/mem"})
    wrong = dict.fromkeys(written.packs, "0" * 64)
    store._indexes.clear()  # as a fresh daemon: the index is read and checked
    with pytest.raises(ArtifactCorrupt, match=r"index of pack .* fails its checksum"):
        store.restore(ns, listing, wrong, {"mem": tmp_path / "out/mem"})


def test_collector_deletes_only_what_nothing_names(store: ChunkStore, tmp_path: Path) -> None:
    ns = namespace("alice")
    collector = Collector(store.blobs)
    memory_file(tmp_path / "a", "a")
    memory_file(tmp_path / "b", "b")
    kept, _ = put(store, ns, "snap_kept", {"mem": tmp_path / "a"}, {})
    gone, _ = put(store, ns, "snap_gone", {"mem": tmp_path / "b"}, {})
    packs = {p: PackRecord(size=1, index_sha256="") for p in kept.packs}

    async def committed() -> Committed:
        return Committed({"snap_kept"}, packs)

    async def run() -> int:
        # A snapshot being written pins the pack it is writing: spared while it writes.
        async with collector.writing(ns, "snap_new", committed) as writing:
            writing.pins |= set(gone.packs)
            assert await collector.collect(ns, committed) == 1  # the unnamed listing
            spared = {p.name for p in (tmp_path / "store").rglob("*.pack")}
        assert {f"{p}.pack" for p in gone.packs} <= spared
        return await collector.collect(ns, committed)

    deleted = asyncio.run(run())
    assert deleted == 2  # unpinned now: the unnamed pack and its index
    left = {p.name for p in (tmp_path / "store").rglob("*") if p.is_file()}
    assert left == {f"{p}.{ext}" for p in kept.packs for ext in ("pack", "idx")} | {
        "snap_kept.listing"
    }
