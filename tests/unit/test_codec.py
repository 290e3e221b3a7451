"""The sparse zstd codec: exact round trips, holes and zeros cost nothing, damage is caught."""

from __future__ import annotations

import dataclasses
import os
from pathlib import Path

import pytest

from hatchvm.snapshots.codec import PIECE, ArtifactInfo, decode, encode
from hatchvm.snapshots.errors import ArtifactCorrupt, ArtifactMissing

MIB = 1 << 20


def sparse_file(path: Path) -> bytes:
    """64 MiB: a hole, random data, explicit zeros, text, a hole to the end."""
    with path.open("wb") as f:
        f.truncate(64 * MIB)
        f.seek(3 * MIB + 17)
        f.write(os.urandom(5 * MIB))
        f.write(bytes(8 * MIB))
        f.write(b"hello " * 50_000)
        f.seek(40 * MIB - 3)
        f.write(b"edge of a piece")
    return path.read_bytes()


def test_round_trip_is_exact_and_sparse(tmp_path: Path) -> None:
    original = sparse_file(tmp_path / "mem")
    info = encode(tmp_path / "mem", tmp_path / "mem.zst")
    assert info.raw_size == 64 * MIB
    assert info.stored_size == (tmp_path / "mem.zst").stat().st_size
    # Random data does not compress; holes and zeros must add (almost) nothing to it.
    assert 5 * MIB < info.stored_size < 5 * MIB + 200_000

    decode(tmp_path / "mem.zst", tmp_path / "out", info)
    assert (tmp_path / "out").read_bytes() == original
    assert (tmp_path / "out").stat().st_blocks * 512 < 8 * MIB  # holes stay holes
    assert not list(tmp_path.glob("*.tmp"))


def test_empty_and_all_zero_files(tmp_path: Path) -> None:
    (tmp_path / "empty").write_bytes(b"")
    (tmp_path / "zeros").write_bytes(bytes(3 * PIECE + 5))
    for name in ("empty", "zeros"):
        info = encode(tmp_path / name, tmp_path / f"{name}.zst")
        assert info.stored_size < 100
        decode(tmp_path / f"{name}.zst", tmp_path / f"{name}.out", info)
        assert (tmp_path / f"{name}.out").read_bytes() == (tmp_path / name).read_bytes()


def test_a_flipped_byte_is_refused_and_nothing_is_written(tmp_path: Path) -> None:
    sparse_file(tmp_path / "mem")
    info = encode(tmp_path / "mem", tmp_path / "mem.zst")
    stored = bytearray((tmp_path / "mem.zst").read_bytes())
    stored[len(stored) // 2] ^= 0xFF
    (tmp_path / "mem.zst").write_bytes(bytes(stored))
    with pytest.raises(ArtifactCorrupt):
        decode(tmp_path / "mem.zst", tmp_path / "out", info)
    assert not (tmp_path / "out").exists() and not (tmp_path / "out.tmp").exists()


def test_wrong_checksum_and_truncation_are_refused(tmp_path: Path) -> None:
    sparse_file(tmp_path / "mem")
    info = encode(tmp_path / "mem", tmp_path / "mem.zst")
    with pytest.raises(ArtifactCorrupt, match="checksum"):
        decode(tmp_path / "mem.zst", tmp_path / "out", dataclasses.replace(info, sha256="0" * 64))
    data = (tmp_path / "mem.zst").read_bytes()
    (tmp_path / "mem.zst").write_bytes(data[: len(data) // 3])
    with pytest.raises(ArtifactCorrupt):
        decode(tmp_path / "mem.zst", tmp_path / "out", info)


def test_missing_artifact(tmp_path: Path) -> None:
    with pytest.raises(ArtifactMissing):
        decode(tmp_path / "nope.zst", tmp_path / "out", ArtifactInfo(1, 1, "0" * 64))
