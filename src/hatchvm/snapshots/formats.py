"""Binary formats of the chunk store: a pack's index and a snapshot's chunk listing.

A chunk is one page (4 KiB; the last of a file may be shorter), named by the first 16 bytes of
its sha256. A pack holds blocks back to back; a block is one zstd frame of up to BLOCK_CHUNKS
chunks. A pack's index (a separate small object) says, block by block, its compressed length
and the names and lengths of its chunks. A listing says, per artifact (mem, disk, state), its
raw size and which chunk is at which page; pages it does not name are zero (or holes).

Both are zstd-compressed; integers are little-endian.
"""

from __future__ import annotations

import hashlib
import struct
from array import array
from dataclasses import dataclass
from functools import cached_property
from itertools import accumulate, repeat

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

INDEX_MAGIC = b"HVPIDX01"
LISTING_MAGIC = b"HVLIST01"
_U32 = struct.Struct("<I")
_BLOCK = struct.Struct("<IH")  # compressed length, chunk count
_ARTIFACT = struct.Struct("<QI")  # raw size, number of chunks


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
    names: tuple[bytes, ...]
    sizes: tuple[int, ...]  # raw bytes of each chunk


@dataclass(frozen=True)
class PackIndex:
    blocks: tuple[Block, ...]

    @cached_property
    def locations(self) -> dict[bytes, tuple[int, int, int]]:
        """Each chunk's block number, offset in the block's raw bytes, and size."""
        where: dict[bytes, tuple[int, int, int]] = {}
        for number, block in enumerate(self.blocks):
            slots = accumulate(block.sizes, initial=0)
            where.update(zip(block.names, zip(repeat(number), slots, block.sizes), strict=False))
        return where

    def encode(self) -> bytes:
        out = bytearray(INDEX_MAGIC)
        out += _U32.pack(len(self.blocks))
        for b in self.blocks:
            out += _BLOCK.pack(b.length, len(b.names))
            out += array("H", b.sizes).tobytes()  # little-endian hosts only (x86, arm64)
            out += b"".join(b.names)
        return _compress(bytes(out))

    @classmethod
    def decode(cls, data: bytes, what: str) -> PackIndex:
        raw = memoryview(_decompress(data, what))
        try:
            if bytes(raw[:8]) != INDEX_MAGIC:
                raise ValueError("bad magic")
            (count,) = _U32.unpack_from(raw, 8)
            pos, offset = 12, 0
            blocks = []
            for _ in range(count):
                length, n = _BLOCK.unpack_from(raw, pos)
                pos += _BLOCK.size
                sizes = array("H")
                sizes.frombytes(raw[pos : pos + 2 * n])
                pos += 2 * n
                names = tuple(
                    bytes(raw[p : p + HASH_LEN]) for p in range(pos, pos + n * HASH_LEN, HASH_LEN)
                )
                pos += n * HASH_LEN
                if len(names) != n or len(sizes) != n:
                    raise ValueError("truncated")
                blocks.append(Block(offset, length, names, tuple(sizes)))
                offset += length
        except (ValueError, struct.error) as exc:
            raise ArtifactCorrupt(f"{what} is corrupt ({exc})") from None
        return cls(tuple(blocks))


@dataclass
class Listing:
    """One artifact's chunks: page numbers (ascending) and the chunk at each."""

    raw_size: int
    pages: array  # array("I")
    names: bytearray  # HASH_LEN bytes per page

    def name(self, i: int) -> bytes:
        return bytes(self.names[i * HASH_LEN : (i + 1) * HASH_LEN])

    def digest(self) -> str:
        """sha256 of the raw size, pages and names: it pins the artifact's every byte."""
        sha = hashlib.sha256(struct.pack("<Q", self.raw_size))
        sha.update(self.pages.tobytes())
        sha.update(self.names)
        return sha.hexdigest()


def encode_listing(artifacts: dict[str, Listing]) -> bytes:
    out = bytearray(LISTING_MAGIC)
    out += _U32.pack(len(artifacts))
    for name, listing in artifacts.items():
        encoded = name.encode()
        out += bytes([len(encoded)]) + encoded
        out += _ARTIFACT.pack(listing.raw_size, len(listing.pages))
        # Page numbers as deltas: runs of 1 compress to almost nothing.
        deltas = array("I", listing.pages)
        for i in range(len(deltas) - 1, 0, -1):
            deltas[i] -= deltas[i - 1]
        out += deltas.tobytes()
        out += listing.names
    return _compress(bytes(out))


def decode_listing(data: bytes, what: str) -> dict[str, Listing]:
    raw = memoryview(_decompress(data, what))
    try:
        if bytes(raw[:8]) != LISTING_MAGIC:
            raise ValueError("bad magic")
        (count,) = _U32.unpack_from(raw, 8)
        pos = 12
        artifacts: dict[str, Listing] = {}
        for _ in range(count):
            n = raw[pos]
            name = bytes(raw[pos + 1 : pos + 1 + n]).decode()
            pos += 1 + n
            raw_size, chunks = _ARTIFACT.unpack_from(raw, pos)
            pos += _ARTIFACT.size
            pages = array("I")
            pages.frombytes(raw[pos : pos + 4 * chunks])
            pos += 4 * chunks
            for i in range(1, len(pages)):
                pages[i] += pages[i - 1]
            names = bytearray(raw[pos : pos + HASH_LEN * chunks])
            pos += HASH_LEN * chunks
            if len(pages) != chunks or len(names) != HASH_LEN * chunks:
                raise ValueError("truncated")
            artifacts[name] = Listing(raw_size, pages, names)
    except (ValueError, struct.error, IndexError, UnicodeDecodeError) as exc:
        raise ArtifactCorrupt(f"{what} is corrupt ({exc})") from None
    return artifacts
