"""Binary formats of the chunk store: a pack's index and a snapshot's listing.

A chunk is one page (4 KiB; the last of a file may be shorter), named by the first 16 bytes of
its sha256: the name is what dedup looks up. A pack holds blocks back to back; a block is one
zstd frame of up to BLOCK_CHUNKS chunks. A pack's index (a separate small object) says, block
by block, its compressed length, the sha256 of its frame, and the names and lengths of its
chunks. A listing names the packs a snapshot uses and, per artifact (mem, disk, state), its raw
size and its runs: so many pages from this page on are the chunks of that block from that
slot on. Pages no run covers are zero (or holes).

Verification on read is a chain: the snapshot's row holds the sha256 of its listing and of
every pack index it uses; an index holds the sha256 of every block's frame; a frame is hashed
as read, before it is decompressed (a damaged one never reaches the decompressor). Hashing the
frame rather than the raw bytes costs a restore a fraction of the time: on
bench/snapshot.py's guest the frames are a third to a quarter of the raw bytes, and sha256
(300 MB/s on a core without SHA extensions) was a fifth of the restore.

Both are zstd-compressed; integers are little-endian.
"""

from __future__ import annotations

import hashlib
import struct
from dataclasses import dataclass
from functools import cached_property
from itertools import accumulate

import zstandard

from hatchvm.snapshots.errors import ArtifactCorrupt

PAGE = 4096
HASH_LEN = 16  # 128 bits of sha256: no accidental collision, and a forged one costs 2^64 work
# Chunks per zstd frame (8 MiB raw). Pages are named one by one (that is what dedup needs: a
# page of one VM sits at another address in the next), but compressed together: measured on
# bench/snapshot.py's guest (352 MiB of pages), 4 KiB frames store 130 MiB and decompress at
# ~400 MB/s, 64 KiB ones 121 MiB, 8 MiB ones 68 MiB at over 1 GB/s (guest memory repeats itself
# megabytes apart). The price: a restore needing one page of a block decompresses all of it.
BLOCK_CHUNKS = 2048
BLOCK_WINDOW_LOG = 23  # the whole block is the window (level 3 alone would use 2 MiB)

INDEX_MAGIC = b"HVPIDX03"  # 03: block hashes are of the compressed frame
LISTING_MAGIC = b"HVLIST02"
_U32 = struct.Struct("<I")
_BLOCK = struct.Struct("<IH32s")  # compressed length, chunk count, sha256 of the frame
_ARTIFACT = struct.Struct("<QI")  # raw size, number of runs
_RUN = struct.Struct("<IIHHH")  # first page, pages, pack number, block, first slot
Run = tuple[int, int, int, int, int]


def chunk_name(data: bytes | memoryview) -> bytes:
    return hashlib.sha256(data).digest()[:HASH_LEN]


def _compress(data: bytes) -> bytes:
    return zstandard.ZstdCompressor(level=3).compress(data)


def _decompress(data: bytes, what: str) -> bytes:
    try:
        return zstandard.ZstdDecompressor().decompress(data, max_output_size=1 << 30)
    except zstandard.ZstdError as exc:
        raise ArtifactCorrupt(f"{what} is corrupt (does not decompress: {exc})") from None


@dataclass(frozen=True)
class Block:
    offset: int  # in the pack
    length: int  # compressed bytes
    sha256: bytes  # of the compressed frame
    names: tuple[bytes, ...]
    sizes: tuple[int, ...]  # raw bytes of each chunk

    @cached_property
    def slots(self) -> tuple[int, ...]:
        """Where each chunk starts in the raw bytes, and (last) where the last one ends."""
        return tuple(accumulate(self.sizes, initial=0))


@dataclass(frozen=True)
class PackIndex:
    blocks: tuple[Block, ...]

    @cached_property
    def locations(self) -> dict[bytes, tuple[int, int]]:
        """Each chunk's block number and slot."""
        where: dict[bytes, tuple[int, int]] = {}
        for number, block in enumerate(self.blocks):
            for slot, name in enumerate(block.names):
                where.setdefault(name, (number, slot))
        return where

    def encode(self) -> bytes:
        out = bytearray(INDEX_MAGIC)
        out += _U32.pack(len(self.blocks))
        for b in self.blocks:
            out += _BLOCK.pack(b.length, len(b.names), b.sha256)
            out += struct.pack(f"<{len(b.sizes)}H", *b.sizes)
            out += b"".join(b.names)
        return _compress(bytes(out))

    @classmethod
    def decode(cls, data: bytes, what: str) -> PackIndex:
        raw = _decompress(data, what)
        try:
            if raw[:8] != INDEX_MAGIC:
                raise ValueError("bad magic")
            (count,) = _U32.unpack_from(raw, 8)
            pos, offset = 12, 0
            blocks = []
            for _ in range(count):
                length, n, sha = _BLOCK.unpack_from(raw, pos)
                pos += _BLOCK.size
                sizes = struct.unpack_from(f"<{n}H", raw, pos)
                pos += 2 * n
                names = tuple(
                    raw[p : p + HASH_LEN] for p in range(pos, pos + n * HASH_LEN, HASH_LEN)
                )
                pos += n * HASH_LEN
                if len(names) != n or pos > len(raw):
                    raise ValueError("truncated")
                blocks.append(Block(offset, length, sha, names, sizes))
                offset += length
        except (ValueError, struct.error) as exc:
            raise ArtifactCorrupt(f"{what} is corrupt ({exc})") from None
        return cls(tuple(blocks))


@dataclass
class Listing:
    """One artifact: its size and its runs (first page, pages, pack number, block, slot)."""

    raw_size: int
    runs: list[Run]

    def digest(self, packs: list[str]) -> str:
        """sha256 of the raw size and the runs (with pack ids): it pins every byte, since
        every block a run points into is pinned by its hash."""
        sha = hashlib.sha256(struct.pack("<Q", self.raw_size))
        for page, count, pack, block, slot in self.runs:
            sha.update(_RUN.pack(page, count, 0, block, slot) + packs[pack].encode())
        return sha.hexdigest()


def encode_listing(packs: list[str], artifacts: dict[str, Listing]) -> bytes:
    out = bytearray(LISTING_MAGIC)
    out += _U32.pack(len(packs))
    for pack in packs:
        encoded = pack.encode()
        out += bytes([len(encoded)]) + encoded
    out += _U32.pack(len(artifacts))
    for name, listing in artifacts.items():
        encoded = name.encode()
        out += bytes([len(encoded)]) + encoded
        out += _ARTIFACT.pack(listing.raw_size, len(listing.runs))
        for run in listing.runs:
            out += _RUN.pack(*run)
    return _compress(bytes(out))


def decode_listing(data: bytes, what: str) -> tuple[list[str], dict[str, Listing]]:
    raw = _decompress(data, what)
    try:
        if raw[:8] != LISTING_MAGIC:
            raise ValueError("bad magic")
        pos = 8
        packs: list[str] = []
        (count,) = _U32.unpack_from(raw, pos)
        pos += 4
        for _ in range(count):
            n = raw[pos]
            packs.append(raw[pos + 1 : pos + 1 + n].decode())
            pos += 1 + n
        (count,) = _U32.unpack_from(raw, pos)
        pos += 4
        artifacts: dict[str, Listing] = {}
        for _ in range(count):
            n = raw[pos]
            name = raw[pos + 1 : pos + 1 + n].decode()
            pos += 1 + n
            raw_size, runs = _ARTIFACT.unpack_from(raw, pos)
            pos += _ARTIFACT.size
            items = list(_RUN.iter_unpack(raw[pos : pos + runs * _RUN.size]))
            pos += runs * _RUN.size
            if len(items) != runs or any(run[2] >= len(packs) for run in items):
                raise ValueError("truncated or bad pack number")
            artifacts[name] = Listing(raw_size, items)
    except (ValueError, struct.error, IndexError, UnicodeDecodeError) as exc:
        raise ArtifactCorrupt(f"{what} is corrupt ({exc})") from None
    return packs, artifacts
