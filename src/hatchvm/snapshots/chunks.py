"""The content-addressed chunk store: every page a user's snapshots hold is stored once.

Layout, under the artifact store (HATCH_DATA_DIR/snapshots or s3://bucket/snapshots/):

    users/<ns>/packs/<pack>.pack        blocks of compressed chunks, back to back
    users/<ns>/packs/<pack>.idx         the pack's index (formats.PackIndex)
    users/<ns>/manifests/<vm>/<snap>.listing   a snapshot's chunk listing (formats.Listing)

<ns> is derived from the user id: chunks are shared between the snapshots and VMs of one user
and never across users (sharing would leak sizes and timings between tenants).

Writing: pages are hashed, zero pages skipped, pages the user already stores are found by
name in the indexes of their packs, new ones are compressed in blocks and written in packs of
about PACK_RAW raw bytes; then the listing (runs of pages pointing into blocks). Reading
fetches the blocks it needs in parallel (adjacent ones as one ranged read), verifies each
against its index (whose own hash the snapshot's row holds) and writes the runs straight into
sparse files.

Everything here blocks; callers run it in a thread. Who may delete what is gc.py's business.
"""

from __future__ import annotations

import hashlib
import os
import secrets
import threading
from collections import OrderedDict
from collections.abc import Iterator
from concurrent.futures import FIRST_EXCEPTION, Future, ThreadPoolExecutor, wait
from dataclasses import dataclass, field
from pathlib import Path

import structlog
import zstandard

from hatchvm.snapshots.codec import data_extents
from hatchvm.snapshots.errors import (
    ArtifactCorrupt,
    ArtifactError,
    ArtifactMissing,
    StoreStopped,
)
from hatchvm.snapshots.formats import (
    BLOCK_CHUNKS,
    BLOCK_WINDOW_LOG,
    PAGE,
    Block,
    Listing,
    PackIndex,
    Run,
    chunk_name,
    decode_listing,
    encode_listing,
)
from hatchvm.snapshots.store import ArtifactStore

ROOT = "users"
PACK_RAW = 32 << 20  # raw bytes per pack (4 blocks): a few MiB stored each, few S3 requests
READ_SPAN = 8 << 20  # the most one ranged read fetches (a larger block is read alone)
READ_GAP = 256 << 10  # blocks this close together are fetched in one read, the gap discarded
_READ = 4 << 20
_ZERO_READ = bytes(_READ)
_ZERO_PAGE = bytes(PAGE)
INDEX_CACHE = 512  # pack indexes kept in memory (packs never change, so never stale)

log = structlog.get_logger("hatchvm.snapshots")


def namespace(user_id: str) -> str:
    """The user's chunk namespace: a digest, so user ids of any form make safe keys."""
    return "u" + hashlib.sha256(user_id.encode()).hexdigest()[:32]


def pack_key(ns: str, pack: str) -> str:
    return f"{ROOT}/{ns}/packs/{pack}.pack"


def index_key(ns: str, pack: str) -> str:
    return f"{ROOT}/{ns}/packs/{pack}.idx"


def listing_key(ns: str, vm_id: str, snap_id: str) -> str:
    return f"{ROOT}/{ns}/manifests/{vm_id}/{snap_id}.listing"


def vm_listings(ns: str, vm_id: str) -> str:
    return f"{ROOT}/{ns}/manifests/{vm_id}/"


Location = tuple[str, int, int]  # pack, block number, slot


@dataclass(frozen=True)
class PackInfo:
    size: int  # bytes stored: pack and index
    index_sha256: str  # of the stored index: a restore checks the index against it


@dataclass
class Known:
    """The chunks already stored in a user's committed packs: where each is."""

    where: dict[bytes, Location] = field(default_factory=dict)
    block_sizes: dict[tuple[str, int], int] = field(default_factory=dict)

    def add(self, pack: str, index: PackIndex) -> None:
        for number, block in enumerate(index.blocks):
            self.block_sizes[(pack, number)] = block.length
        for name, (number, slot) in index.locations.items():
            self.where.setdefault(name, (pack, number, slot))


@dataclass(frozen=True)
class ArtifactSummary:
    raw_size: int
    stored_size: int  # compressed bytes of the blocks a restore of it reads
    sha256: str  # of its listing: raw size and runs


@dataclass
class Written:
    """Chunks stored (packs durable), listing not yet written."""

    packs: list[str]  # every pack the runs point into, in the listing's order
    listings: dict[str, Listing]
    artifacts: dict[str, ArtifactSummary]
    new_packs: dict[str, PackInfo]  # packs written now
    # Uncompressed bytes of the pages named but not written: the user's store held them
    # already, or they came earlier in these files (metrics: bytes saved by shared chunks).
    shared_bytes: int = 0


@dataclass(frozen=True)
class StoredListing:
    key: str
    size: int
    sha256: str


def _pages(path: Path) -> Iterator[tuple[int, bytes]]:
    """(page number, bytes) of every page of the file that is not a hole or all zero."""
    with path.open("rb") as f:
        fd = f.fileno()
        size = os.fstat(fd).st_size
        done = 0  # pages before this offset were read already
        for start, end in data_extents(fd, size):
            pos = max(start - start % PAGE, done)
            while pos < end:
                data = os.pread(fd, min(_READ, end - pos + (-(end - pos)) % PAGE), pos)
                if not data:
                    break
                if data != _ZERO_READ[: len(data)]:
                    for off in range(0, len(data), PAGE):
                        page = data[off : off + PAGE]
                        if page != _ZERO_PAGE[: len(page)]:
                            yield (pos + off) // PAGE, page
                pos += len(data)
            done = pos


class _Compressors(threading.local):
    def __init__(self, level: int) -> None:
        params = zstandard.ZstdCompressionParameters.from_level(level, window_log=BLOCK_WINDOW_LOG)
        self.z = zstandard.ZstdCompressor(compression_params=params)


_Sealed = tuple[Future[bytes], list[bytes], list[int]]  # compressed data, names, sizes


class _PackWriter:
    """New chunks -> blocks (compressed in the pool) -> packs (uploaded in the background).
    Each pack's id joins `pins` before a byte of it is written: the collector spares it."""

    def __init__(self, chunks: ChunkStore, ns: str, pins: set[str]) -> None:
        self._c = chunks
        self._ns = ns
        self._pins = pins
        self.where: dict[bytes, Location] = {}
        self.block_sizes: dict[tuple[str, int], int] = {}
        self.packs: dict[str, PackInfo] = {}
        self._block: list[bytes] = []
        self._names: list[bytes] = []
        self._pack: str | None = None
        self._blocks: list[_Sealed] = []
        self._raw = 0
        self._uploads: list[Future[tuple[str, PackInfo, list[int]]]] = []

    def add(self, name: bytes, page: bytes) -> Location:
        if self._pack is None:
            self._pack = secrets.token_hex(10)
            self._pins.add(self._pack)
        where = (self._pack, len(self._blocks), len(self._block))
        self.where[name] = where
        self._block.append(page)
        self._names.append(name)
        if len(self._block) == BLOCK_CHUNKS:
            self._seal_block()
            if self._raw >= PACK_RAW:
                self._seal_pack()
        return where

    def _seal_block(self) -> None:
        data = b"".join(self._block)
        future = self._c.cpu.submit(self._c.compress, data)
        self._blocks.append((future, self._names, [len(p) for p in self._block]))
        self._raw += len(data)
        self._block, self._names = [], []

    def _seal_pack(self) -> None:
        if self._block:
            self._seal_block()
        if self._pack is None:
            return
        upload = self._c.io.submit(self._upload, self._pack, self._blocks)
        self._uploads.append(upload)
        self._pack, self._blocks, self._raw = None, [], 0
        pending = [u for u in self._uploads if not u.done()]
        if len(pending) > 2:  # bounds the memory held by packs waiting to be written
            pending[0].result()

    def _upload(self, pack: str, blocks: list[_Sealed]) -> tuple[str, PackInfo, list[int]]:
        datas = [future.result() for future, _, _ in blocks]
        index, offset = [], 0
        for data, (_, names, sizes) in zip(datas, blocks, strict=True):
            sha = hashlib.sha256(data).digest()
            index.append(Block(offset, len(data), sha, tuple(names), tuple(sizes)))
            offset += len(data)
        built = PackIndex(tuple(index))
        encoded = built.encode()
        # The pack before its index: an index never names bytes that are not there.
        self._c.blobs.write_blob(pack_key(self._ns, pack), b"".join(datas))
        self._c.blobs.write_blob(index_key(self._ns, pack), encoded)
        digest = hashlib.sha256(encoded).hexdigest()
        self._c.remember(self._ns, pack, built, digest)
        return pack, PackInfo(offset + len(encoded), digest), [len(d) for d in datas]

    def close(self) -> None:
        """Write what is left and wait until every pack is durable."""
        self._seal_pack()
        done, _ = wait(self._uploads, return_when=FIRST_EXCEPTION)
        for upload in done:
            upload.result()  # raises the first failure
        for upload in self._uploads:
            pack, info, lengths = upload.result()
            self.packs[pack] = info
            for number, length in enumerate(lengths):
                self.block_sizes[(pack, number)] = length


_Want = tuple[int, int, str, int]  # raw start, raw end, artifact, offset in its file
_Read = tuple[str, int, int, list[tuple[int, Block]]]  # pack, start, end, its blocks


@dataclass(frozen=True)
class RestorePlan:
    """A checked snapshot's restore, ready to run: each artifact's size, and the ranged reads
    that fill it (ChunkStore.plan_restore, ChunkStore.fill)."""

    ns: str
    sizes: dict[str, int]  # artifact -> bytes
    reads: list[_Read]
    wants: dict[tuple[str, int], list[_Want]]  # (pack, block) -> where its bytes go


class ChunkStore:
    def __init__(self, blobs: ArtifactStore, level: int = 3, io_workers: int = 4) -> None:
        self.blobs = blobs
        workers = max(1, os.cpu_count() or 1)
        self.cpu = ThreadPoolExecutor(workers, thread_name_prefix="chunk-cpu")
        self.io = ThreadPoolExecutor(io_workers, thread_name_prefix="chunk-io")
        self._io_workers = io_workers
        self._compressors = _Compressors(level)
        self._indexes: OrderedDict[tuple[str, str], tuple[PackIndex, str]] = OrderedDict()
        self._lock = threading.Lock()

    def close(self) -> None:
        self.cpu.shutdown(wait=True, cancel_futures=True)
        self.io.shutdown(wait=True, cancel_futures=True)

    def compress(self, data: bytes) -> bytes:
        return self._compressors.z.compress(data)

    # ---- indexes -----------------------------------------------------------------------

    def index(self, ns: str, pack: str, sha256: str) -> PackIndex:
        """The pack's index, checked against the sha256 a committed snapshot recorded."""
        with self._lock:
            cached = self._indexes.get((ns, pack))
            if cached is not None:
                self._indexes.move_to_end((ns, pack))
        if cached is None:
            try:
                data = self.blobs.read_blob(index_key(ns, pack))
            except ArtifactMissing:
                raise ArtifactMissing(f"pack {pack} is missing (no index)") from None
            digest = hashlib.sha256(data).hexdigest()
            if digest == sha256:  # only a good index is worth decoding and keeping
                cached = (PackIndex.decode(data, f"the index of pack {pack}"), digest)
                self.remember(ns, pack, *cached)
            else:
                cached = (PackIndex(()), digest)
        if cached[1] != sha256:
            raise ArtifactCorrupt(f"the index of pack {pack} fails its checksum")
        return cached[0]

    def remember(self, ns: str, pack: str, index: PackIndex, sha256: str) -> None:
        with self._lock:
            self._indexes[(ns, pack)] = (index, sha256)
            while len(self._indexes) > INDEX_CACHE:
                self._indexes.popitem(last=False)

    def _indexes_of(self, ns: str, packs: dict[str, str]) -> dict[str, PackIndex]:
        """Indexes of packs (id -> index sha256), fetched in parallel."""
        names = sorted(packs)
        with ThreadPoolExecutor(self._io_workers) as pool:  # not self.io: callers may be in it
            found = pool.map(lambda p: self.index(ns, p, packs[p]), names)
            return dict(zip(names, found, strict=True))

    def known(self, ns: str, packs: dict[str, str]) -> Known:
        """What the user stores in these committed packs (id -> index sha256). A pack whose
        index is missing or damaged is left out: its chunks are stored anew, not named."""
        known = Known()
        for pack in sorted(packs):
            try:
                known.add(pack, self.index(ns, pack, packs[pack]))
            except ArtifactError as exc:
                log.warning("pack not reused", pack=pack, reason=str(exc))
        return known

    # ---- writing -----------------------------------------------------------------------

    def write_chunks(
        self,
        ns: str,
        files: dict[str, Path],
        known: Known,
        pins: set[str],
        stop: threading.Event | None = None,
    ) -> Written:
        """Store every chunk of files the user does not hold yet; durable on return. Raises
        StoreStopped soon after stop is set (the snapshot or its VM is being deleted)."""
        writer = _PackWriter(self, ns, pins)
        seen = 0
        numbers: dict[str, int] = {}  # pack -> its number in the listing
        listings: dict[str, Listing] = {}
        used: dict[str, set[tuple[str, int]]] = {}
        shared = 0
        try:
            for artifact, path in files.items():
                runs: list[Run] = []
                last = (-2, 0, -1, -1, -1)  # the run being extended
                blocks: set[tuple[str, int]] = set()
                for number, page in _pages(path):
                    seen += 1
                    if stop is not None and seen % 1024 == 0 and stop.is_set():
                        raise StoreStopped("its store was called off")
                    name = chunk_name(page)
                    where = known.where.get(name) or writer.where.get(name)
                    if where is None:
                        where = writer.add(name, page)
                    else:
                        shared += len(page)
                    pack, block, slot = where
                    blocks.add((pack, block))
                    if pack not in numbers:
                        numbers[pack] = len(numbers)
                    first, count, pack_no, run_block, run_slot = last
                    if (
                        first + count == number
                        and pack_no == numbers[pack]
                        and run_block == block
                        and run_slot + count == slot
                    ):
                        last = (first, count + 1, pack_no, block, run_slot)
                        runs[-1] = last
                    else:
                        last = (number, 1, numbers[pack], block, slot)
                        runs.append(last)
                listings[artifact] = Listing(path.stat().st_size, runs)
                used[artifact] = blocks
        finally:
            writer.close()
        sizes = {**known.block_sizes, **writer.block_sizes}
        packs = sorted(numbers, key=numbers.__getitem__)
        artifacts = {
            name: ArtifactSummary(
                raw_size=listing.raw_size,
                stored_size=sum(sizes[where] for where in used[name]),
                sha256=listing.digest(packs),
            )
            for name, listing in listings.items()
        }
        return Written(packs, listings, artifacts, writer.packs, shared)

    def write_listing(self, key: str, written: Written) -> StoredListing:
        data = encode_listing(written.packs, written.listings)
        self.blobs.write_blob(key, data)
        return StoredListing(key, len(data), hashlib.sha256(data).hexdigest())

    # ---- reading -----------------------------------------------------------------------

    def read_listing(self, listing: StoredListing) -> tuple[list[str], dict[str, Listing]]:
        try:
            data = self.blobs.read_blob(listing.key)
        except ArtifactMissing:
            raise ArtifactMissing("its listing is missing") from None
        if hashlib.sha256(data).hexdigest() != listing.sha256:
            raise ArtifactCorrupt("its listing fails its sha256 checksum")
        return decode_listing(data, "its listing")

    def restore(
        self, ns: str, listing: StoredListing, packs: dict[str, str], dests: dict[str, Path]
    ) -> None:
        """Rebuild each artifact as the sparse file dests[name]: every block verified before
        a byte of it is written. packs: id -> index sha256, as the snapshot's row has them."""
        plan = self.plan_restore(ns, listing, packs, set(dests))
        for name, path in dests.items():
            with path.open("wb") as f:
                os.ftruncate(f.fileno(), plan.sizes[name])
        self.fill(plan, dests)

    def plan_restore(
        self, ns: str, listing: StoredListing, packs: dict[str, str], names: set[str]
    ) -> RestorePlan:
        """What restoring the snapshot takes: its listing and the indexes of its packs,
        fetched and checked, so a snapshot that cannot be restored fails here, before any
        file is touched. names: the artifacts the caller expects."""
        order, listings = self.read_listing(listing)
        if set(listings) != names or not set(order) <= set(packs):
            raise ArtifactCorrupt("its listing does not match its manifest")
        indexes = self._indexes_of(ns, {p: packs[p] for p in order})
        wants: dict[tuple[str, int], list[_Want]] = {}
        for artifact, items in listings.items():
            for page, count, pack_no, number, slot in items.runs:
                pack = order[pack_no]
                blocks = indexes[pack].blocks
                if number >= len(blocks) or slot + count >= len(blocks[number].slots):
                    raise ArtifactCorrupt(f"its listing points outside pack {pack}")
                slots = blocks[number].slots
                want = (slots[slot], slots[slot + count], artifact, page * PAGE)
                if want[3] + want[1] - want[0] > items.raw_size:
                    raise ArtifactCorrupt(f"its listing runs past the end of {artifact}")
                wants.setdefault((pack, number), []).append(want)
        sizes = {artifact: items.raw_size for artifact, items in listings.items()}
        return RestorePlan(ns, sizes, _plan_reads(indexes, wants), wants)

    def fill(self, plan: RestorePlan, dests: dict[str, Path]) -> None:
        """Write the plan's pages into dests[name], existing files of plan.sizes[name] bytes
        that hold nothing else (holes): every block verified before a byte of it is written.
        The ranged reads run in parallel."""
        files = {name: dests[name].open("r+b") for name in plan.sizes}
        try:
            fds = {name: f.fileno() for name, f in files.items()}
            futures = [
                self.io.submit(self._read_span, plan.ns, *read, plan.wants, fds)
                for read in plan.reads
            ]
            done, pending = wait(futures, return_when=FIRST_EXCEPTION)
            for future in pending:
                future.cancel()
            for future in done:
                future.result()
            wait(pending)
        finally:
            for f in files.values():
                f.close()

    def _read_span(
        self,
        ns: str,
        pack: str,
        start: int,
        end: int,
        blocks: list[tuple[int, Block]],
        wants: dict[tuple[str, int], list[_Want]],
        fds: dict[str, int],
    ) -> None:
        try:
            data = self.blobs.read_blob(pack_key(ns, pack), start, end - start)
        except ArtifactMissing:
            raise ArtifactMissing(f"pack {pack} is missing") from None
        if len(data) != end - start:
            raise ArtifactCorrupt(f"pack {pack} is corrupt (too short)")
        view = memoryview(data)
        decompressor = zstandard.ZstdDecompressor()
        for number, block in blocks:
            frame = view[block.offset - start : block.offset - start + block.length]
            if hashlib.sha256(frame).digest() != block.sha256:
                raise ArtifactCorrupt(f"block {number} of pack {pack} fails its checksum")
            try:
                raw = decompressor.decompress(frame, max_output_size=block.slots[-1])
            except zstandard.ZstdError:
                raise ArtifactCorrupt(f"pack {pack} is corrupt (does not decompress)") from None
            if len(raw) != block.slots[-1]:
                raise ArtifactCorrupt(f"block {number} of pack {pack} has the wrong size")
            out = memoryview(raw)
            for first, last, artifact, offset in wants[(pack, number)]:
                os.pwrite(fds[artifact], out[first:last], offset)


def _plan_reads(
    indexes: dict[str, PackIndex], wants: dict[tuple[str, int], list[_Want]]
) -> list[_Read]:
    """Ranged reads covering every wanted block: neighbours share a read up to READ_SPAN."""
    by_pack: dict[str, list[int]] = {}
    for pack, number in wants:
        by_pack.setdefault(pack, []).append(number)
    reads: list[_Read] = []
    for pack, numbers in by_pack.items():
        blocks = indexes[pack].blocks
        current: list[tuple[int, Block]] = []
        for number in sorted(numbers):
            block = blocks[number]
            if current:
                first, last = current[0][1], current[-1][1]
                gap = block.offset - (last.offset + last.length)
                if gap > READ_GAP or block.offset + block.length - first.offset > READ_SPAN:
                    reads.append(_span(pack, current))
                    current = []
            current.append((number, block))
        if current:
            reads.append(_span(pack, current))
    # Largest first: the pool stays busy to the end.
    return sorted(reads, key=lambda r: r[2] - r[1], reverse=True)


def _span(pack: str, blocks: list[tuple[int, Block]]) -> _Read:
    start = blocks[0][1].offset
    end = blocks[-1][1].offset + blocks[-1][1].length
    return pack, start, end, blocks


__all__ = [
    "ArtifactError",
    "ChunkStore",
    "Known",
    "PackInfo",
    "RestorePlan",
    "StoredListing",
    "Written",
    "namespace",
]
