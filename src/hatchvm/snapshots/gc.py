"""Garbage collection of the chunk store: a pack (or listing) is deleted only when no committed
manifest names it and no snapshot being written may still name it.

"Committed" is the database: a snapshot's row is written last (after its packs and its
listing), and its manifest lists every pack its chunks are in. One hatchd owns a store, so
the snapshots under way are known here, in memory:

- a writer, under the user's lock, reads the committed packs and pins them (it will only
  reuse chunks of pinned packs); each pack it writes is pinned before its first byte;
- the collector, under the same lock, lists the store first, then reads the pins, then the
  committed rows, and deletes what is listed but neither pinned nor committed.

A writer that committed before the collector read the rows is seen in the rows; one that had
not is seen in the pins (it unpins only after its row commits); a pack it started writing
after the listing is not deleted (it was not listed). A crash leaves only unpinned,
uncommitted packs, which the next collection removes; nothing committed is ever deleted.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass, field

import structlog

from hatchvm.crashpoints import crashpoint
from hatchvm.snapshots.chunks import ROOT
from hatchvm.snapshots.manifest import PackRecord
from hatchvm.snapshots.store import ArtifactStore

log = structlog.get_logger("hatchvm.snapshots")


@dataclass(frozen=True)
class Committed:
    """What a user's snapshot rows name: snapshot ids and every pack their chunks are in."""

    snapshots: set[str]
    packs: dict[str, PackRecord]


CommittedFn = Callable[[], Awaitable[Committed]]


@dataclass
class Writing:
    """One snapshot being written: the packs it may name, and its id."""

    snapshot_id: str
    committed: Committed
    pins: set[str] = field(default_factory=set)


class Collector:
    def __init__(self, blobs: ArtifactStore) -> None:
        self.blobs = blobs
        self._locks: dict[str, asyncio.Lock] = {}
        self._writing: dict[str, list[Writing]] = {}

    def _lock(self, ns: str) -> asyncio.Lock:
        return self._locks.setdefault(ns, asyncio.Lock())

    @asynccontextmanager
    async def writing(
        self, ns: str, snapshot_id: str, committed: CommittedFn
    ) -> AsyncIterator[Writing]:
        """Pins for one snapshot's write; leave only after its row is committed (or given up)."""
        async with self._lock(ns):
            now = await committed()
            entry = Writing(snapshot_id, now, set(now.packs))
            self._writing.setdefault(ns, []).append(entry)
        try:
            yield entry
        finally:
            self._writing[ns].remove(entry)

    async def collect(self, ns: str, committed: CommittedFn) -> int:
        """Delete the namespace's packs and listings nothing names; returns how many objects."""
        async with self._lock(ns):
            listed = await asyncio.to_thread(self.blobs.list_blobs, f"{ROOT}/{ns}/")
            pinned: set[str] = set()
            writing: set[str] = set()
            for entry in self._writing.get(ns, []):
                pinned |= entry.pins.copy()  # copy(): writer threads add to it
                writing.add(entry.snapshot_id)
            now = await committed()
            keep_packs = pinned | set(now.packs)
            keep_snaps = writing | now.snapshots
            doomed = [key for key, _ in listed if not _kept(key, keep_packs, keep_snaps)]
            if not doomed:
                return 0
            # Packs first: an index a crash leaves without its pack is named by nothing and goes
            # in the next sweep.
            doomed.sort(key=lambda key: not key.endswith(".pack"))
            half = len(doomed) // 2
            await asyncio.to_thread(self.blobs.delete_blobs, doomed[:half])
            crashpoint("gc.sweeping")
            await asyncio.to_thread(self.blobs.delete_blobs, doomed[half:])
            log.info("chunk store collected", namespace=ns, deleted=len(doomed))
            return len(doomed)

    async def namespaces(self) -> set[str]:
        listed = await asyncio.to_thread(self.blobs.list_blobs, f"{ROOT}/")
        return {key.split("/")[1] for key, _ in listed if key.count("/") >= 2}


def _kept(key: str, packs: set[str], snapshots: set[str]) -> bool:
    parts = key.split(
        "/"
    )  # users/<ns>/packs/<pack>.pack | users/<ns>/manifests/<vm>/<snap>.listing
    name = parts[-1].split(".")[0]
    if len(parts) == 4 and parts[2] == "packs":
        return name in packs
    if len(parts) == 5 and parts[2] == "manifests":
        return name in snapshots
    return True  # not ours to judge
