"""Snapshot artifacts: the sparse zstd codec, the manifest, and where artifacts are stored."""
