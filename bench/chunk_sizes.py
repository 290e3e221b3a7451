"""Which chunk size for the content-addressed snapshot store? Measured on real snapshot files.

Given memory (or disk) files of snapshots, for each candidate chunk size: the bytes the first
file stores alone (its distinct non-zero chunks, each zstd-compressed on its own), what each
further file adds to what is already stored, and the manifest's size (a 16-byte hash and a
small index delta per non-zero chunk). Files are taken in the order given; every file after
the first is compared with all before it, as a user's chunk namespace would be.

    .venv/bin/python bench/chunk_sizes.py FIRST [MORE ...]
"""

from __future__ import annotations

import argparse
import hashlib
import os
from pathlib import Path

import zstandard

SIZES = [4 << 10, 16 << 10, 64 << 10, 256 << 10, 1 << 20]
MANIFEST_ENTRY = 17  # 16-byte hash + about one byte of index delta


def chunks(path: Path, size: int) -> list[bytes]:
    with path.open("rb") as f:
        fd = f.fileno()
        end = os.fstat(fd).st_size
        out = []
        for pos in range(0, end, size):
            out.append(os.pread(fd, size, pos))
        return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("files", nargs="+", type=Path)
    parser.add_argument("--level", type=int, default=3)
    args = parser.parse_args()
    z = zstandard.ZstdCompressor(level=args.level)
    print(
        f"{'chunk':>6} {'file':>18} {'chunks':>7} {'added MiB':>9} {'alone MiB':>9} "
        f"{'manifest KiB':>12}"
    )
    for size in SIZES:
        seen: dict[bytes, int] = {}
        zero = bytes(size)
        for path in args.files:
            count = added = alone = 0
            mine: set[bytes] = set()
            for data in chunks(path, size):
                if data == zero[: len(data)]:
                    continue
                count += 1
                digest = hashlib.blake2b(data, digest_size=16).digest()
                if digest in mine:
                    continue
                mine.add(digest)
                stored = seen.get(digest)
                if stored is None:
                    stored = seen[digest] = len(z.compress(data))
                    added += stored
                alone += stored
            manifest = count * MANIFEST_ENTRY
            print(
                f"{size >> 10:>5}K {path.name:>18} {count:>7} {added / 2**20:>9.2f} "
                f"{alone / 2**20:>9.2f} {manifest / 1024:>12.1f}",
                flush=True,
            )


if __name__ == "__main__":
    main()
