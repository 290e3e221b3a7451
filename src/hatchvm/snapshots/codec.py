"""Sparse-aware zstd artifacts for memory and disk files.

Only what holds data is stored: holes (found with SEEK_DATA/SEEK_HOLE) and all-zero pieces
are skipped, so untouched guest memory and unused disk blocks cost nothing. The stored form
is one zstd stream (multi-threaded) of records `offset, length, bytes`; the checksum is
sha256 of the stored bytes, so a restore can refuse a damaged artifact before using it.
"""

from __future__ import annotations

import hashlib
import os
import struct
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO

import zstandard

from hatchvm.snapshots.errors import ArtifactCorrupt, ArtifactMissing

MAGIC = b"HATCHSP1"
HEADER = struct.Struct("<8sQ")  # magic, raw size
RECORD = struct.Struct("<QQ")  # offset, length; a zero length ends the stream
CHUNK = 4 << 20  # read size
PIECE = 64 << 10  # zero-detection granularity
# Long-distance matching over a 32 MiB window: guest memory repeats itself far apart (the
# same file in the page cache and in a process, copies of buffers), which a plain level-3
# window (a few MiB) cannot see. Measured on bench/snapshot.py's guest: 77 -> 30 MiB, and
# faster. 32 MiB keeps the compressor's memory near 80 MiB (128 MiB would more than double it).
WINDOW_LOG = 25
_ZERO_CHUNK = bytes(CHUNK)
_ZERO_PIECE = bytes(PIECE)


@dataclass(frozen=True)
class ArtifactInfo:
    raw_size: int  # the size of the file it restores
    stored_size: int  # compressed bytes
    sha256: str  # of the compressed bytes


def data_extents(fd: int, size: int) -> Iterator[tuple[int, int]]:
    """(start, end) ranges that may hold data; the whole file where holes are not reported."""
    pos = 0
    while pos < size:
        try:
            start = os.lseek(fd, pos, os.SEEK_DATA)
        except OSError:  # ENXIO: only a hole remains
            return
        end = os.lseek(fd, start, os.SEEK_HOLE)
        yield start, min(end, size)
        pos = end


def _nonzero_runs(chunk: bytes, base: int) -> Iterator[tuple[int, bytes]]:
    """Runs of PIECE-sized pieces of chunk that are not all zero, as (offset, bytes)."""
    if chunk == _ZERO_CHUNK[: len(chunk)]:
        return
    view = memoryview(chunk)
    run_start: int | None = None
    for pos in range(0, len(chunk), PIECE):
        zero = view[pos : pos + PIECE] == _ZERO_PIECE[: min(PIECE, len(chunk) - pos)]
        if zero and run_start is not None:
            yield base + run_start, chunk[run_start:pos]
            run_start = None
        elif not zero and run_start is None:
            run_start = pos
    if run_start is not None:
        yield base + run_start, chunk[run_start:]


class _HashingWriter:
    def __init__(self, raw: BinaryIO) -> None:
        self.raw = raw
        self.sha = hashlib.sha256()
        self.size = 0

    def write(self, data: bytes) -> int:
        self.sha.update(data)
        self.size += len(data)
        return self.raw.write(data)

    def flush(self) -> None:
        self.raw.flush()


def encode(src: Path, dest: Path, level: int = 3) -> ArtifactInfo:
    """Compress src into dest (written to dest.tmp, renamed when complete and synced)."""
    tmp = dest.with_name(dest.name + ".tmp")
    params = zstandard.ZstdCompressionParameters.from_level(
        level, threads=-1, enable_ldm=True, window_log=WINDOW_LOG
    )
    compressor = zstandard.ZstdCompressor(compression_params=params)
    with src.open("rb") as f, tmp.open("wb") as out:
        size = os.fstat(f.fileno()).st_size
        sink = _HashingWriter(out)
        with compressor.stream_writer(sink, closefd=False) as z:
            z.write(HEADER.pack(MAGIC, size))
            for start, end in data_extents(f.fileno(), size):
                pos = start
                while pos < end:
                    chunk = os.pread(f.fileno(), min(CHUNK, end - pos), pos)
                    if not chunk:
                        break
                    for offset, data in _nonzero_runs(chunk, pos):
                        z.write(RECORD.pack(offset, len(data)))
                        z.write(data)
                    pos += len(chunk)
            z.write(RECORD.pack(size, 0))
        out.flush()
        os.fsync(out.fileno())
    os.replace(tmp, dest)
    return ArtifactInfo(raw_size=size, stored_size=sink.size, sha256=sink.sha.hexdigest())


def _sha256_of(f: BinaryIO) -> str:
    sha = hashlib.sha256()
    while data := f.read(CHUNK):
        sha.update(data)
    f.seek(0)
    return sha.hexdigest()


def _read_exact(stream: zstandard.ZstdDecompressionReader, size: int) -> bytes:
    parts = []
    while size:
        data = stream.read(size)
        if not data:
            raise ArtifactCorrupt("stream ends early")
        parts.append(data)
        size -= len(data)
    return b"".join(parts)


def decode(src: Path, dest: Path, info: ArtifactInfo) -> None:
    """Rebuild the sparse file dest from src after verifying its checksum. dest is written only
    when everything checks out (via dest.tmp); raise ArtifactCorrupt or ArtifactMissing."""
    tmp = dest.with_name(dest.name + ".tmp")
    try:
        f = src.open("rb")
    except FileNotFoundError:
        raise ArtifactMissing(f"{src.name} is missing") from None
    try:
        with f, tmp.open("wb") as out:
            # Checked before decompressing: damaged bytes never reach the decoder.
            if _sha256_of(f) != info.sha256:
                raise ArtifactCorrupt(f"{src.name} fails its sha256 checksum")
            try:
                _unpack(f, out, info.raw_size)
            except zstandard.ZstdError as exc:
                raise ArtifactCorrupt(f"{src.name} does not decompress: {exc}") from None
            # No fsync: a restored file is a working copy; the artifact stays the durable one.
        os.replace(tmp, dest)
    finally:
        tmp.unlink(missing_ok=True)


def _unpack(src: BinaryIO, out: BinaryIO, raw_size: int) -> None:
    stream = zstandard.ZstdDecompressor().stream_reader(src, read_size=CHUNK)
    magic, size = HEADER.unpack(_read_exact(stream, HEADER.size))
    if magic != MAGIC or size != raw_size:
        raise ArtifactCorrupt("bad header")
    out.truncate(size)  # a sparse file of the right size; records fill in the data
    fd = out.fileno()
    while True:
        offset, length = RECORD.unpack(_read_exact(stream, RECORD.size))
        if length == 0:
            break
        if offset + length > size:
            raise ArtifactCorrupt("record beyond the end of the file")
        while length:
            data = stream.read(min(length, CHUNK))
            if not data:
                raise ArtifactCorrupt("stream ends early")
            os.pwrite(fd, data, offset)
            offset += len(data)
            length -= len(data)
