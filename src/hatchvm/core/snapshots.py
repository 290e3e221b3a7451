"""Snapshots and restores, under the same per-VM lock as every other VM operation.

A snapshot pauses the guest and saves only its device state: its RAM already is a file
(vms.MEM_NAME) and its disk is quiet once paused. The VMM process ends, then RAM, disk and
state go into the chunk store (snapshots/chunks.py: every page the user already stores is only
named). Write order: chunks, then the listing, then the snapshot row, so a half-written
snapshot is never listed and a listed one never lacks a chunk; until the row is written the
VM's own files can resume it, so a failed store or a daemon crash never loses the VM. Chunks
no committed snapshot names are collected (snapshots/gc.py) after deletes and at start-up.

After a snapshot the VM's files still equal it (the "hot copy", marked by resume/LATEST):
restoring that snapshot maps them directly, without reading the store. Any other restore
first checks the snapshot's listing and pack indexes, then puts the VM's files aside
(journalled: a failure, or a daemon killed meanwhile, puts them back) and writes the chunks,
each block verified, into fresh sparse files in their place while the VMM starts and waits for
its state. An old-format snapshot is decoded whole before the VM's files are touched.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import secrets
import shutil
import threading
import time
from collections.abc import Awaitable, Callable
from datetime import UTC, datetime
from pathlib import Path
from typing import Literal

import structlog

from hatchvm.config import Settings
from hatchvm.core import quotas
from hatchvm.core.standbys import Standbys
from hatchvm.core.states import Op, State, guard
from hatchvm.core.storing import StoreTasks, Then
from hatchvm.core.vms import DISK_NAME, MEM_NAME, RESUME_DIR, VMService, reason_of
from hatchvm.crashpoints import crashpoint, holdpoint
from hatchvm.db import repo
from hatchvm.db.models import FAILED, STORED, STORING, VM, Snapshot
from hatchvm.errors import Conflict, InternalError, NotFound, QuotaExceeded
from hatchvm.ids import new_id
from hatchvm.metrics import Metrics
from hatchvm.snapshots import codec, frozen
from hatchvm.snapshots.chunks import ChunkStore, StoredListing, Written, listing_key, namespace
from hatchvm.snapshots.errors import ArtifactError, ArtifactMissing, StoreStopped
from hatchvm.snapshots.gc import Collector, Committed, CommittedFn, Writing
from hatchvm.snapshots.manifest import (
    ARTIFACT_NAMES,
    ArtifactRecord,
    ChunkRecord,
    PackRecord,
    SnapshotManifest,
)
from hatchvm.snapshots.store import ArtifactStore
from hatchvm.sparse import copy_sparse
from hatchvm.vmm.base import BootSpec, Feature

log = structlog.get_logger("hatchvm.core")

STATE_NAME = "state"  # device state inside the resume dir
LATEST = "snapshot_id"  # resume/LATEST: the stored snapshot the VM's files equal
PENDING = "pending"  # resume/PENDING: the snapshot being stored (for crash recovery)
WORK_DIR = "snapshot-work"
PREVIOUS_DIR = "restore-previous"  # the VM's files, put aside while a restore replaces them
JOURNAL = "journal.json"  # in PREVIOUS_DIR: the VM's state before, and which files it had
RETIRED = "restore-retired-"  # PREVIOUS_DIR once a restore succeeded, until it is deleted


def _read(path: Path) -> str | None:
    try:
        return path.read_text().strip() or None
    except OSError:
        return None


def host_boot_id() -> str:
    return Path("/proc/sys/kernel/random/boot_id").read_text().strip()


def _remove(path: Path) -> None:
    if path.is_dir():
        shutil.rmtree(path)
    else:
        path.unlink(missing_ok=True)


def _old_format(snap: Snapshot) -> bool:
    """Stored in its own files (manifest version 1), not as chunks; an unreadable manifest
    counts as old: deleting its folder is harmless either way."""
    try:
        return SnapshotManifest.parse(snap.manifest).chunks is None
    except ArtifactError:
        return True


def latest_restorable(snaps: list[Snapshot]) -> Snapshot | None:
    """The newest snapshot that did not fail to store (snaps: newest first)."""
    return next((s for s in snaps if s.status != FAILED), None)


Fill = Callable[[], Awaitable[None]]  # writes a restore's files, laid out empty beforehand

Use = Literal["restore", "fork"]
_USED: dict[Use, str] = {"restore": "restored", "fork": "forked"}


def _reset_dir(path: Path) -> None:
    shutil.rmtree(path, ignore_errors=True)
    path.mkdir(parents=True)


class SnapshotService:
    def __init__(
        self,
        settings: Settings,
        vms: VMService,
        store: ArtifactStore,
        metrics: Metrics | None = None,
    ) -> None:
        self._s = settings
        self.vms = vms
        self.store = store
        # S3 answers each ranged read after a round trip: more of them in flight.
        io_workers = 8 if store.backend == "s3" else 3
        self.chunks = ChunkStore(store, settings.snapshot_zstd_level, io_workers)
        self.collector = Collector(store)
        self.storing = StoreTasks()
        self._discarding: set[asyncio.Task[None]] = set()  # retired files being deleted
        self._copying: set[asyncio.Task[None]] = set()  # see own_copy_later
        vms.teardown_hooks.append(self._call_off_stores)
        vms.delete_hooks.append(self._forget_vm)
        self.metrics = metrics or Metrics()
        self.standbys = Standbys(vms, settings.wake_standbys, self.metrics)

    async def close(self) -> None:
        await self.storing.close()  # with what follows each store (it may offer a standby)
        await asyncio.gather(*self._copying)  # each ends with the standby it may offer
        await self.standbys.close()
        self.chunks.close()

    # ---- reads -------------------------------------------------------------------------

    async def list(self, user_id: str, vm_id: str) -> list[Snapshot]:
        await self.vms.get(user_id, vm_id)
        async with self.vms.sessions() as session:
            return await repo.list_snapshots(session, vm_id)

    async def get(self, user_id: str, snapshot_id: str) -> Snapshot:
        async with self.vms.sessions() as session:
            snap = await repo.get_snapshot(session, snapshot_id)
        if snap is None or snap.user_id != user_id:
            raise NotFound(f"snapshot {snapshot_id} not found")
        return snap

    def _resume_dir(self, vm_id: str) -> Path:
        return self.vms.vm_dir(vm_id) / RESUME_DIR

    @staticmethod
    def _prefix(vm_id: str, snapshot_id: str) -> str:
        return f"{vm_id}/{snapshot_id}"

    # ---- snapshot ----------------------------------------------------------------------

    async def snapshot(self, user_id: str, vm_id: str, automatic: bool = False) -> Snapshot:
        """Freeze a running VM into a new snapshot; the VM ends `snapshotted`.

        automatic (the idle reaper): at the quota, the oldest automatic snapshot makes room,
        once the new one is safely stored."""
        await self.vms.get(user_id, vm_id)
        await self.vms.require(Feature.SNAPSHOTS, vm_id)
        async with self.vms.locks.hold(vm_id):
            vm = await self.vms.get(user_id, vm_id)
            guard(Op.SNAPSHOT, vm.state)
            await self._check_storage(vm)
            return await self._take_within_quota(vm, automatic)

    async def snapshot_if_idle(self, user_id: str, vm_id: str, cutoff: datetime) -> Snapshot | None:
        """The reaper's snapshot: automatic, and only if the VM is still running and still
        unused since cutoff once its lock is held (a request may have just woken it)."""
        if not (await self.vms.vmm.capabilities()).snapshots:
            return None  # the driver cannot: the VM keeps running
        async with self.vms.locks.hold(vm_id):
            vm = await self.vms.get(user_id, vm_id)
            if vm.state != State.RUNNING or vm.last_activity_at >= cutoff:
                return None
            try:
                await self._check_storage(vm)
            except QuotaExceeded as exc:  # the VM runs on; its user must make room first
                log.warning("idle snapshot skipped", vm_id=vm_id, reason=exc.message)
                return None
            return await self._take_within_quota(vm, automatic=True)

    async def _check_storage(self, vm: VM) -> None:
        async with self.vms.sessions() as session:
            used = await repo.snapshot_bytes(session, vm.user_id)
        quotas.check_snapshot(self._s, used)

    async def _take_within_quota(self, vm: VM, automatic: bool) -> Snapshot:
        limit = self._s.max_snapshots_per_vm
        async with self.vms.sessions() as session:
            snaps = await repo.list_snapshots(session, vm.id)  # newest first
        autos = [s for s in snaps if s.automatic]
        if len(snaps) >= limit and not (automatic and autos and limit > 0):
            raise QuotaExceeded(f"snapshot limit reached ({len(snaps)}/{limit})")
        # Room is made once the new one is stored (_after_store): a capture or a store that
        # fails must not have cost an older snapshot.
        return await self._take(vm, automatic)

    async def _make_room(self, vm: VM) -> None:
        """Over the per-VM limit (an automatic snapshot was let in at it): the oldest
        automatic snapshots go."""
        limit = self._s.max_snapshots_per_vm
        async with self.vms.sessions() as session:
            snaps = await repo.list_snapshots(session, vm.id)  # newest first
        autos = [s for s in snaps if s.automatic and s.status != STORING]
        while len(snaps) > limit and autos:
            oldest = autos.pop()
            await self._delete(vm, oldest)
            snaps.remove(oldest)

    async def _take(self, vm: VM, automatic: bool) -> Snapshot:
        """Capture the guest and return: the snapshot is listed `storing` while its files are
        stored in the background (_store), off the VM's lock."""
        snap_id = new_id("snap")
        resume = self._resume_dir(vm.id)
        began = time.monotonic()
        await self.vms.update(vm.id, state=State.SNAPSHOTTING)
        await asyncio.to_thread(_reset_dir, resume)
        # Written first: a daemon that dies from here on finds which snapshot was under way.
        await asyncio.to_thread((resume / PENDING).write_text, snap_id)
        crashpoint("snapshot.begun")
        try:
            await self.vms.vmm.snapshot(vm.id, self.vms.vm_dir(vm.id), resume / STATE_NAME)
        except Exception as exc:
            reason = reason_of(exc)
            self.metrics.snapshot_failed("capture")
            log.error("snapshot capture failed", vm_id=vm.id, reason=reason)
            state = await self._after_failed_capture(vm, reason)
            raise InternalError(f"snapshot of {vm.id} failed: {reason} (vm is {state})") from exc
        crashpoint("snapshot.captured")
        captured = time.monotonic()
        self.metrics.snapshot_captured(automatic, captured - began)
        await self.vms.detach_network(vm)
        frozen_dir = self._frozen_dir(vm.id, snap_id)
        ns = namespace(vm.user_id)
        snap = Snapshot(
            id=snap_id,
            vm_id=vm.id,
            user_id=vm.user_id,
            size_bytes=0,
            storage=self.store.backend,
            location=self.store.location(listing_key(ns, vm.id, snap_id)),
            manifest="{}",  # its chunks are named once they are all stored
            automatic=automatic,
            status=STORING,
            created_at=datetime.now(UTC),
        )
        try:
            boot = host_boot_id()
            files = self._captured_files(vm.id)
            await asyncio.to_thread(frozen.freeze, files, frozen_dir, boot)
            # The VM's own files equal the snapshot (its hot copy) from here on. Not fsynced:
            # it counts only within this host boot (like the RAM file it vouches for).
            await asyncio.to_thread((resume / LATEST).write_text, f"{snap_id} {boot}")
            # The snapshot row and the VM's new state commit together.
            await self.vms.update(
                vm.id,
                state=State.SNAPSHOTTED,
                state_reason=None,
                touch=not automatic,
                add=[snap],
            )
        except Exception as exc:
            reason = reason_of(exc)
            self.metrics.snapshot_failed("store")
            log.error("snapshot not kept", vm_id=vm.id, snapshot_id=snap_id, reason=reason)
            await asyncio.to_thread(frozen.forget, frozen_dir)
            state = await self.resume_local(vm, f"keeping snapshot {snap_id} failed: {reason}")
            raise InternalError(f"snapshot of {vm.id} failed: {reason} (vm is {state})") from exc
        await asyncio.to_thread((resume / PENDING).unlink, True)
        crashpoint("snapshot.recorded")
        self._store_in_background(vm, snap_id, automatic)
        now = time.monotonic()
        log.info(
            "vm snapshotted",
            vm_id=vm.id,
            snapshot_id=snap_id,
            status=STORING,
            capture_s=round(captured - began, 3),  # state saved, VMM ended
            keep_s=round(now - captured, 3),  # network detached, files frozen, row written
        )
        return snap

    def _captured_files(self, vm_id: str) -> dict[str, Path]:
        vm_dir = self.vms.vm_dir(vm_id)
        resume = self._resume_dir(vm_id)
        return {"mem": vm_dir / MEM_NAME, "disk": vm_dir / DISK_NAME, "state": resume / STATE_NAME}

    def _frozen_dir(self, vm_id: str, snap_id: str) -> Path:
        return self.vms.vm_dir(vm_id) / frozen.STORING_DIR / snap_id

    def _store_in_background(self, vm: VM, snap_id: str, automatic: bool) -> None:
        async def run(stop: threading.Event) -> Then | None:
            return await self._store(vm, snap_id, automatic, stop)

        self.storing.start(snap_id, vm.id, run)

    async def _store(
        self, vm: VM, snap_id: str, automatic: bool, stop: threading.Event
    ) -> Then | None:
        """Store the frozen files, then settle the row: `stored` with its manifest (chunks,
        then the listing, then the row: a row never names a missing chunk), or `failed`.
        Returns what must follow under the VM's lock."""
        frozen_dir = self._frozen_dir(vm.id, snap_id)
        ns = namespace(vm.user_id)
        started = time.monotonic()
        try:
            await holdpoint("snapshot.storing", released=stop.is_set)
            if stop.is_set():
                raise StoreStopped("its store was called off")
            files = await asyncio.to_thread(
                frozen.frozen_files, frozen_dir, ARTIFACT_NAMES, host_boot_id()
            )
            if files is None:
                raise ArtifactMissing("its captured files are gone")
            # Pinned from before the first chunk until the row is settled: the collector
            # spares every pack this snapshot may name.
            async with self.collector.writing(ns, snap_id, self._committed(vm.user_id)) as w:
                manifest, shared = await self.store_files(vm, snap_id, files, w, stop)
                crashpoint("snapshot.stored")
                assert manifest.chunks is not None
                async with self.vms.sessions() as session, session.begin():
                    settled = await repo.settle_snapshot(
                        session,
                        snap_id,
                        status=STORED,
                        size_bytes=manifest.chunks.added_bytes,
                        manifest=manifest.model_dump_json(),
                    )
            ok, reason = True, ""
            if settled:
                seconds = time.monotonic() - started
                self.metrics.snapshot_stored(automatic, seconds, manifest.chunks.added_bytes)
                self.metrics.deduplicated(shared)  # pages the store now holds once
        except StoreStopped:
            # Called off by a delete (which removes the row, the files and the chunks), or at
            # shutdown (still `storing`: the next hatchd resumes it).
            return None
        except Exception as exc:
            ok, reason = False, reason_of(exc)
            self.metrics.snapshot_failed("store")
            log.error("snapshot store failed", vm_id=vm.id, snapshot_id=snap_id, reason=reason)
            async with self.vms.sessions() as session, session.begin():
                settled = await repo.settle_snapshot(
                    session, snap_id, status=FAILED, status_reason=f"storing failed: {reason}"
                )
            await self._collect(vm.user_id)  # what it wrote is named by nothing
        crashpoint("snapshot.settled")
        await asyncio.to_thread(frozen.forget, frozen_dir)
        if not settled:
            await self._collect(vm.user_id)  # deleted meanwhile: its chunks too
            return None
        seconds = round(time.monotonic() - started, 3)
        log.info("snapshot stored" if ok else "snapshot failed", snapshot_id=snap_id, s=seconds)

        async def then() -> None:
            await self._after_store(vm.user_id, vm.id, snap_id, reason if not ok else None)

        return then

    async def _after_store(
        self, user_id: str, vm_id: str, snap_id: str, failure: str | None
    ) -> None:
        """Under the VM's lock, once a store settled: make room for a stored snapshot, or,
        for one that failed while the VM still sleeps on its files, resume the VM from them
        (as any snapshot that cannot be stored), or stop it if nothing can resume it."""
        async with self.vms.locks.hold(vm_id):
            try:
                vm = await self.vms.get(user_id, vm_id)
            except NotFound:
                return  # deleted meanwhile
            if failure is None:
                await self._make_room(vm)
                await self._offer_standby(vm, snap_id)
                return
            if vm.state != State.SNAPSHOTTED:
                return  # woken meanwhile: it runs on its own copy
            why = f"storing snapshot {snap_id} failed: {failure}"
            if await asyncio.to_thread(self._latest, vm.id) == snap_id:
                await self.resume_local(vm, why)
                return
            async with self.vms.sessions() as session:
                restorable = await repo.count_restorable(session, vm.id)
            if restorable == 0:
                await asyncio.to_thread(self.vms.drop_memory, vm.id)
                await self.vms.update(
                    vm.id, state=State.STOPPED, state_reason=f"{why}; the guest's memory is lost"
                )

    async def _offer_standby(self, vm: VM, snap_id: str) -> None:
        """A wake standby for vm (its lock held) if it sleeps on its own files and snap_id,
        the snapshot they equal, is stored: no store reads them through another link then,
        but a fork's children may still link its memory file: the VM gets a copy of its own
        first (see own_copy_later)."""
        if (
            vm.state == State.SNAPSHOTTED
            and await asyncio.to_thread(self._latest, vm.id) == snap_id
        ):
            await self._own_copy(vm)
            await self.standbys.offer(vm)

    def own_copy_later(self, vm_id: str) -> None:
        """A fork of a VM asleep on its own files links its memory file into the children
        (they map it privately), so its wake would first copy that file (frozen.unshare) and
        could not use its standby, which maps the linked one. In the background, under its
        lock, the VM gets that copy now, and a standby on it once its snapshot is stored:
        its next wake does neither. Shutdown waits for it."""
        task = asyncio.create_task(self._own_copy_of(vm_id), name=f"own-copy-{vm_id}")
        self._copying.add(task)
        task.add_done_callback(self._copying.discard)

    async def _own_copy_of(self, vm_id: str) -> None:
        try:
            async with self.vms.locks.hold(vm_id):
                vm = await self.vms.load(vm_id)
                latest = await asyncio.to_thread(self._latest, vm_id)
                if vm is None or vm.state != State.SNAPSHOTTED or latest is None:
                    return  # woken (on a copy of its own), deleted, or not on its files
                if not await self._own_copy(vm):
                    return
                async with self.vms.sessions() as session:
                    snap = await repo.get_snapshot(session, latest)
                if snap is not None and snap.status == STORED:  # else its store's end offers
                    await self.standbys.offer(vm)
        except Exception as exc:  # its wake makes the copy as before
            log.warning("no copy of its own for a forked vm", vm_id=vm_id, reason=reason_of(exc))

    async def _own_copy(self, vm: VM) -> bool:
        """vm (asleep on its own files, its lock held) on files nobody else links: those
        that are linked are replaced by copies, and its standby, which maps the replaced
        ones, is ended. Whether anything was copied."""
        if not await self._unshare(vm.id):
            return False
        await self.standbys.end(vm)
        return True

    async def offer_standbys(self) -> None:
        """At start-up: the VMs that sleep on their own stored snapshots get wake standbys
        again, the most recently put to sleep first, up to the limit."""
        if self.standbys.limit == 0:
            return
        async with self.vms.sessions() as session:
            sleeping = [vm for vm in await repo.list_vms(session) if vm.state == State.SNAPSHOTTED]
        sleeping.sort(key=lambda vm: vm.updated_at, reverse=True)
        for candidate in sleeping[: self.standbys.limit]:
            async with self.vms.locks.hold(candidate.id):
                vm = await self.vms.load(candidate.id)
                latest = await asyncio.to_thread(self._latest, candidate.id)
                if vm is None or vm.state != State.SNAPSHOTTED or latest is None:
                    continue
                async with self.vms.sessions() as session:
                    snap = await repo.get_snapshot(session, latest)
                if snap is None or snap.status != STORED:
                    continue
                if await asyncio.to_thread(frozen.linked, self.vms.written_files(vm.id)):
                    self.own_copy_later(vm.id)  # a fork's children link them: copy, then offer
                else:
                    await self.standbys.offer(vm)

    def _latest(self, vm_id: str) -> str | None:
        """The snapshot the VM's own files equal, if they can be trusted (same host boot)."""
        snap_id, _, boot = (_read(self._resume_dir(vm_id) / LATEST) or "").partition(" ")
        return snap_id if snap_id and boot == host_boot_id() else None

    async def store_files(
        self,
        vm: VM,
        snap_id: str,
        files: dict[str, Path],
        writing: Writing,
        stop: threading.Event | None = None,
    ) -> tuple[SnapshotManifest, int]:
        """Store the snapshot's files (mem, disk, state) as chunks, then its listing; returns
        the manifest for its row, and the page bytes not written because the user's store held
        them already. Works from the given paths only (the frozen links), off the VM's lock."""
        ns = namespace(vm.user_id)

        def write_chunks() -> Written:
            committed = writing.committed.packs
            known = self.chunks.known(ns, {p: r.index_sha256 for p, r in committed.items()})
            return self.chunks.write_chunks(ns, files, known, writing.pins, stop)

        written = await asyncio.to_thread(write_chunks)
        crashpoint("snapshot.packed")
        await holdpoint("snapshot.packed", released=stop.is_set if stop else lambda: False)
        if stop is not None and stop.is_set():
            raise StoreStopped("its store was called off")
        listing = await asyncio.to_thread(
            self.chunks.write_listing, listing_key(ns, vm.id, snap_id), written
        )
        packs: dict[str, PackRecord] = {}
        for pack in written.packs:
            new = written.new_packs.get(pack)
            packs[pack] = (
                PackRecord(size=new.size, index_sha256=new.index_sha256)
                if new is not None
                else writing.committed.packs[pack]
            )
        manifest = SnapshotManifest(
            snapshot_id=snap_id,
            vm_id=vm.id,
            mem_mib=vm.mem_mib,
            image_id=vm.image_id,
            image_version=vm.image_version,
            artifacts={
                name: ArtifactRecord(
                    raw_size=a.raw_size, stored_size=a.stored_size, sha256=a.sha256
                )
                for name, a in written.artifacts.items()
            },
            chunks=ChunkRecord(
                namespace=ns,
                listing_key=listing.key,
                listing_size=listing.size,
                listing_sha256=listing.sha256,
                packs=packs,
                added_bytes=sum(p.size for p in written.new_packs.values()) + listing.size,
            ),
        )
        return manifest, written.shared_bytes

    def _committed(self, user_id: str) -> CommittedFn:
        async def committed() -> Committed:
            async with self.vms.sessions() as session:
                rows = await repo.user_snapshots(session, user_id)
            packs: dict[str, PackRecord] = {}
            for row in rows:
                with contextlib.suppress(ArtifactError):
                    chunks = SnapshotManifest.parse(row.manifest).chunks
                    if chunks is not None:
                        packs.update(chunks.packs)
            return Committed({row.id for row in rows}, packs)

        return committed

    async def _collect(self, user_id: str) -> None:
        """Delete the user's chunks no snapshot names (after a delete or a failed store)."""
        try:
            await self.collector.collect(namespace(user_id), self._committed(user_id))
        except ArtifactError as exc:
            log.warning("chunk collection failed", reason=str(exc))

    async def collect_all(self) -> None:
        """At start-up: what a crash left (packs of a snapshot never committed, a listing
        without its row, a sweep cut short) is collected, for every user in the store."""
        async with self.vms.sessions() as session:
            users = await repo.snapshot_users(session)
            users |= {vm.user_id for vm in await repo.list_vms(session)}
        by_ns = {namespace(user): user for user in users}
        try:
            found = await self.collector.namespaces()
        except ArtifactError as exc:
            log.warning("chunk collection failed", reason=str(exc))
            return
        for ns in found:
            user = by_ns.get(ns)
            if user is not None:
                await self._collect(user)
            else:  # no snapshot and no VM left: nothing there is named

                async def nothing() -> Committed:
                    return Committed(set(), {})

                with contextlib.suppress(ArtifactError):
                    await self.collector.collect(ns, nothing)

    async def _after_failed_capture(self, vm: VM, reason: str) -> str:
        """The VMM could not save the state: let the guest run on if it still can."""
        vm_dir = self.vms.vm_dir(vm.id)
        resumed = False
        with contextlib.suppress(Exception):
            resumed = await self.vms.vmm.resume_if_paused(vm.id, vm_dir)
        if resumed:
            await asyncio.to_thread(shutil.rmtree, self._resume_dir(vm.id), True)
            # It may have stood paused a while: its clock is resynced like a restore's.
            warning = await self.vms.after_resume(vm)
            await self.vms.update(vm.id, state=State.RUNNING, state_reason=warning)
            return State.RUNNING.value
        await self.vms.vmm.kill(vm.id, vm_dir)
        await self.vms.detach_network(vm)
        await asyncio.to_thread(self.vms.drop_memory, vm.id)
        await self.vms.update(
            vm.id, state=State.STOPPED, state_reason=f"snapshot failed, guest lost: {reason}"
        )
        return State.STOPPED.value

    async def resume_local(self, vm: VM, why: str) -> str:
        """Resume the VM from its own captured files (RAM file + resume/state), after a
        snapshot that could not be stored. Returns the state the VM ends in."""
        state_file = self._resume_dir(vm.id) / STATE_NAME
        try:
            await self._unshare(vm.id)
            image = await self.vms.image_files(vm)
            await self.vms.attach_network(vm)
            await self.vms.vmm.restore(self.vms.boot_spec(vm, image), state_file)
            warning = await self.vms.run(vm, restored=True)
        except Exception as exc:
            reason = reason_of(exc)
            log.error("resume after failed snapshot failed", vm_id=vm.id, reason=reason)
            await self.vms.vmm.kill(vm.id, self.vms.vm_dir(vm.id))
            await self.vms.detach_network(vm)
            await asyncio.to_thread(self.vms.drop_memory, vm.id)
            await self.vms.update(
                vm.id, state=State.STOPPED, state_reason=f"{why}; resuming failed: {reason}"
            )
            return State.STOPPED.value
        await asyncio.to_thread(shutil.rmtree, self._resume_dir(vm.id), True)
        reason = f"{why}; vm resumed" + (f"; {warning}" if warning else "")
        await self.vms.update(vm.id, state=State.RUNNING, state_reason=reason)
        log.warning("vm resumed after failed snapshot", vm_id=vm.id, why=why)
        return State.RUNNING.value

    # ---- restore -----------------------------------------------------------------------

    async def restore(self, user_id: str, vm_id: str, snapshot_id: str | None = None) -> VM:
        """Resume the VM from a snapshot (default: its latest); the VM ends `running`."""
        await self.vms.get(user_id, vm_id)
        await self.vms.require(Feature.SNAPSHOTS, vm_id)
        async with self.vms.locks.hold(vm_id):
            vm = await self.vms.get(user_id, vm_id)
            async with self.vms.sessions() as session:
                snaps = await repo.list_snapshots(session, vm_id)
            if not (vm.state == State.STOPPED and latest_restorable(snaps)):
                guard(Op.RESTORE, vm.state)
            self.vms.require_disk_if_error(vm)
            if snapshot_id is not None:
                snap = next((s for s in snaps if s.id == snapshot_id), None)
                if snap is None:
                    raise NotFound(f"vm {vm_id} has no snapshot {snapshot_id}")
            else:
                snap = latest_restorable(snaps)
                if snap is None:
                    raise Conflict(f"vm {vm_id} has no snapshot to restore")
            return await self.restore_locked(vm, snap)

    async def restore_locked(self, vm: VM, snap: Snapshot) -> VM:
        """Resume vm from snap; the caller holds the VM's lock (the API, or a wake).

        A restore that fails, or a daemon killed during one, leaves the VM's files exactly as
        they were: a restore from the store puts them aside (PREVIOUS_DIR) and back.

        A snapshot still being stored resumes at once from the VM's own files when they are
        it (a wake right after a snapshot); any other waits until it is stored.

        A restore from the VM's own files that fails is made again from the stored snapshot
        (a fresh copy of every file and a fresh VMM), if it is stored: a wake then still
        answers, and the failure is logged with its reason."""
        hot = await asyncio.to_thread(self._latest, vm.id) == snap.id
        if not hot or snap.status != STORED:
            return await self._restore(vm, snap, hot)
        try:
            return await self._restore(vm, snap, hot=True)
        except InternalError:
            log.warning(
                "restoring from the stored snapshot instead", vm_id=vm.id, snapshot_id=snap.id
            )
        return await self._restore(vm, snap, hot=False)

    async def _restore(self, vm: VM, snap: Snapshot, hot: bool) -> VM:
        """restore_locked, from the VM's own files (hot) or laid out from the store."""
        began = time.monotonic()
        prior = vm.state
        resume = self._resume_dir(vm.id)
        snap = await self._usable(vm, snap, hot, "restore")
        async with self.vms.admission.lock:
            space = await asyncio.to_thread(self.vms.space_needed_mib, vm, not hot)
            await self.vms.admission.admit(vm.id, vm.mem_mib, space)
            await self.vms.update(vm.id, state=State.RESTORING)
        crashpoint("restore.begun")
        try:
            await self.standbys.take(vm, usable=hot)  # its VMM started ahead, if it has one
            fill = None if hot else await self._lay_out(vm, snap, prior)
            # From here on the guest changes its RAM file: it no longer equals any snapshot.
            await asyncio.to_thread((resume / LATEST).unlink, True)
            await self._unshare(vm.id)
            image = await self.vms.image_files(vm)
            await self.vms.attach_network(vm)
            spec = self.vms.boot_spec(vm, image)
            if fill is not None:
                await self._fill_while_starting(spec, fill)
            crashpoint("restore.files-ready")
            pid = await self.vms.vmm.restore(spec, resume / STATE_NAME)
            crashpoint("restore.vmm-started")
            warning = await self.vms.run(vm, restored=True)  # the guest's clock and RNG resynced
        except Exception as exc:
            await self.vms.vmm.kill(vm.id, self.vms.vm_dir(vm.id))
            await self.vms.detach_network(vm)
            await asyncio.to_thread(self._put_back, vm.id)
            if isinstance(exc, ArtifactError):
                await self.vms.update(vm.id, state=prior)
                raise self._unusable(vm, snap, exc) from exc
            reason = reason_of(exc)
            self.metrics.snapshot_failed("restore")
            log.error("restore failed", vm_id=vm.id, snapshot_id=snap.id, reason=reason)
            await self.vms.update(vm.id, state=prior, state_reason=f"restore failed: {reason}")
            raise InternalError(f"restoring {vm.id} from {snap.id} failed: {reason}") from exc
        crashpoint("restore.running")
        self._discard(await asyncio.to_thread(self._retire_previous, vm.id))
        self.metrics.restored(hot, time.monotonic() - began)
        log.info("vm restored", vm_id=vm.id, snapshot_id=snap.id, pid=pid, hot=hot)
        return await self.vms.update(vm.id, state=State.RUNNING, state_reason=warning, touch=True)

    def _unusable(self, vm: VM, snap: Snapshot, exc: ArtifactError) -> InternalError:
        """A snapshot whose stored artifacts are missing or damaged (the VM is as it was)."""
        self.metrics.snapshot_failed("restore")
        log.error("snapshot unusable", vm_id=vm.id, snapshot_id=snap.id, reason=str(exc))
        return InternalError(f"snapshot {snap.id} cannot be restored: {exc}")

    async def _usable(self, vm: VM, snap: Snapshot, hot: bool, use: Use) -> Snapshot:
        """snap as it may be used (restored, forked): a snapshot still being stored waits for
        its store unless the VM's own files are it (hot); a failed one never (409)."""
        if snap.status == STORING and not hot:
            log.info(f"{use} waits for its snapshot to be stored", vm_id=vm.id, snapshot_id=snap.id)
            await self.storing.wait(snap.id)  # stores never take the VM's lock
            async with self.vms.sessions() as session:
                row = await repo.get_snapshot(session, snap.id)
            if row is None:
                raise NotFound(f"snapshot {snap.id} was deleted while it was being stored")
            snap = row
            if snap.status == STORING:
                raise Conflict(f"snapshot {snap.id} is still being stored; try again shortly")
        if snap.status == FAILED:
            raise Conflict(
                f"snapshot {snap.id} cannot be {_USED[use]}: {snap.status_reason or 'it failed'}"
            )
        return snap

    async def _unshare(self, vm_id: str) -> list[Path]:
        """The guest is about to write into its RAM file and disk: whoever else links them (a
        store still reading them, forks' frozen memory) keeps the captured bytes (frozen.py).
        The files copied."""
        started = time.monotonic()
        copied = await asyncio.to_thread(frozen.unshare, self.vms.written_files(vm_id))
        if copied:
            seconds = round(time.monotonic() - started, 3)
            names = [path.name for path in copied]
            log.info("resuming on copies of linked files", vm_id=vm_id, files=names, s=seconds)
        return copied

    async def _lay_out(self, vm: VM, snap: Snapshot, prior: str) -> Fill | None:
        """Put the VM's files aside and lay out the snapshot's in their place. A chunked
        snapshot is checked (its listing and pack indexes) and its files made empty at their
        sizes: the Fill returned writes them, so the VMM can start meanwhile. An old-format
        one is decoded whole first (None). Raises ArtifactError before it touches the VM's files."""
        manifest = SnapshotManifest.parse(snap.manifest)
        chunks = manifest.chunks
        if chunks is None:
            await self._unpack_v1(vm, manifest, prior)
            return None
        listing = StoredListing(chunks.listing_key, chunks.listing_size, chunks.listing_sha256)
        names = set(ARTIFACT_NAMES)
        plan = await asyncio.to_thread(
            self.chunks.plan_restore, chunks.namespace, listing, chunks.index_hashes(), names
        )
        dests = await asyncio.to_thread(self._swap_in_empty, vm.id, plan.sizes, prior)
        crashpoint("restore.laid-out")
        return lambda: asyncio.to_thread(self.chunks.fill, plan, dests)

    async def _fill_while_starting(self, spec: BootSpec, fill: Fill) -> None:
        """Fill the snapshot's files while the VMM starts, waiting for its state: its start-up
        is then off a restore's critical path. Both have ended when this returns."""
        results = await asyncio.gather(
            fill(), self.vms.vmm.start_incoming(spec), return_exceptions=True
        )
        for result in results:  # the fill's error first: it says what is wrong
            if isinstance(result, BaseException):
                raise result

    async def _unpack_v1(self, vm: VM, manifest: SnapshotManifest, prior: str) -> None:
        """An old-format snapshot: fetch, verify and decode every artifact; only then put the
        VM's files aside and move the snapshot's in."""
        vm_dir = self.vms.vm_dir(vm.id)
        work = vm_dir / WORK_DIR
        await asyncio.to_thread(_reset_dir, work)
        try:
            await self._write_artifacts(manifest, work)
            await asyncio.to_thread(self._swap_in, vm.id, work, prior)
        finally:
            await asyncio.to_thread(shutil.rmtree, work, True)

    async def _write_artifacts(self, manifest: SnapshotManifest, dest: Path) -> None:
        """Every artifact of the snapshot, fetched, verified and written out into dest."""
        chunks = manifest.chunks
        if chunks is not None:
            listing = StoredListing(chunks.listing_key, chunks.listing_size, chunks.listing_sha256)
            dests = {name: dest / name for name in ARTIFACT_NAMES}
            await asyncio.to_thread(
                self.chunks.restore, chunks.namespace, listing, chunks.index_hashes(), dests
            )
        else:
            await self._decode_v1(manifest, dest)

    async def _decode_v1(self, manifest: SnapshotManifest, work: Path) -> None:
        """An old-format snapshot: one zstd file per artifact."""
        for name in ARTIFACT_NAMES:
            record = manifest.artifacts[name]
            assert record.key is not None
            packed = await self.store.fetch(record.key, work)
            await asyncio.to_thread(codec.decode, packed, work / name, record.info())
            if packed.is_relative_to(work):
                await asyncio.to_thread(packed.unlink)

    async def materialize(self, vm: VM, snap: Snapshot, dest: Path) -> None:
        """The snapshot's files (mem, disk, state) as new files in dest, the VM's own files
        left as they are: copied from them when they still equal it (even while it is being
        stored: they are its captured state until the VM runs again), else fetched, checked
        and unpacked from the store once it is stored. The caller holds the VM's lock."""
        resume = self._resume_dir(vm.id)
        latest = vm.state == State.SNAPSHOTTED and await asyncio.to_thread(self._latest, vm.id)
        hot = latest == snap.id
        snap = await self._usable(vm, snap, hot, "fork")
        if hot:
            vm_dir = self.vms.vm_dir(vm.id)
            # The memory file is shared (a hard link): nobody writes it until the VM runs
            # again, which first gives the VM a copy of its own (frozen.unshare).
            await asyncio.to_thread(os.link, vm_dir / MEM_NAME, dest / "mem")
            for name, source in (("disk", vm_dir / DISK_NAME), ("state", resume / STATE_NAME)):
                await asyncio.to_thread(copy_sparse, source, dest / name)
            return
        try:
            await self._write_artifacts(SnapshotManifest.parse(snap.manifest), dest)
        except ArtifactError as exc:
            raise InternalError(f"snapshot {snap.id} cannot be used: {exc}") from exc

    def _kept_files(self, vm_id: str) -> dict[str, Path]:
        """What a restore replaces, by the name it is kept under in PREVIOUS_DIR."""
        vm_dir = self.vms.vm_dir(vm_id)
        return {"mem": vm_dir / MEM_NAME, "disk": vm_dir / DISK_NAME, "resume": vm_dir / RESUME_DIR}

    def _set_aside(self, vm_id: str, prior: str) -> None:
        """Move the VM's files into PREVIOUS_DIR, journal first; make its resume dir anew."""
        previous = self.vms.vm_dir(vm_id) / PREVIOUS_DIR
        _reset_dir(previous)
        kept = self._kept_files(vm_id)
        had = [name for name, path in kept.items() if path.exists()]
        # The journal first: a daemon killed from here on knows what to put back.
        (previous / JOURNAL).write_text(json.dumps({"state": prior, "had": had}))
        for name in had:
            os.replace(kept[name], previous / name)
        self._resume_dir(vm_id).mkdir()

    def _artifact_paths(self, vm_id: str) -> dict[str, Path]:
        """Where a restore puts each artifact of the snapshot (by its name)."""
        vm_dir = self.vms.vm_dir(vm_id)
        state = self._resume_dir(vm_id) / STATE_NAME
        return {"mem": vm_dir / MEM_NAME, "disk": vm_dir / DISK_NAME, "state": state}

    def _swap_in(self, vm_id: str, work: Path, prior: str) -> None:
        self._set_aside(vm_id, prior)
        for name, path in self._artifact_paths(vm_id).items():
            os.replace(work / name, path)

    def _swap_in_empty(self, vm_id: str, sizes: dict[str, int], prior: str) -> dict[str, Path]:
        """_swap_in with files of the given sizes that hold nothing yet (holes): their paths
        by artifact name."""
        self._set_aside(vm_id, prior)
        dests = self._artifact_paths(vm_id)
        for name, path in dests.items():
            with path.open("xb") as f:
                os.ftruncate(f.fileno(), sizes[name])
        return dests

    def _put_back(self, vm_id: str) -> str | None:
        """Undo _swap_in (after a failed restore, or at start-up after a crash during one);
        returns the VM's state before the restore, or None if nothing was put aside."""
        previous = self.vms.vm_dir(vm_id) / PREVIOUS_DIR
        journal = _read(previous / JOURNAL)
        if journal is None:
            shutil.rmtree(previous, ignore_errors=True)
            return None
        record = json.loads(journal)
        for name, path in self._kept_files(vm_id).items():
            aside = previous / name
            if name in record["had"] and not aside.exists():
                continue  # never moved aside: it is still the VM's own
            _remove(path)
            if aside.exists():
                os.replace(aside, path)
        shutil.rmtree(previous)
        return str(record["state"])

    def _forget_previous(self, vm_id: str) -> None:
        retired = self._retire_previous(vm_id)
        if retired is not None:
            shutil.rmtree(retired, ignore_errors=True)

    def _retire_previous(self, vm_id: str) -> Path | None:
        """After a restore the VM's old files are not needed again: PREVIOUS_DIR is renamed
        at once, so start-up never puts them back, and its new name returned for deleting
        later (a large memory file and its cached pages take tens of milliseconds)."""
        vm_dir = self.vms.vm_dir(vm_id)
        shutil.rmtree(self._resume_dir(vm_id), ignore_errors=True)
        retired = vm_dir / f"{RETIRED}{secrets.token_hex(4)}"
        try:
            os.rename(vm_dir / PREVIOUS_DIR, retired)
        except FileNotFoundError:
            return None
        return retired

    def _discard(self, retired: Path | None) -> None:
        """Delete retired files in the background (a VM deleted meanwhile takes them too)."""
        if retired is None:
            return
        task = asyncio.create_task(asyncio.to_thread(shutil.rmtree, retired, True))
        self._discarding.add(task)
        task.add_done_callback(self._discarding.discard)

    def sweep_retired(self, vm_id: str) -> None:
        """At start-up: retired files whose deletion a stopped daemon did not finish."""
        for retired in self.vms.vm_dir(vm_id).glob(f"{RETIRED}*"):
            shutil.rmtree(retired, ignore_errors=True)

    # ---- delete ------------------------------------------------------------------------

    async def delete(self, user_id: str, snapshot_id: str) -> None:
        snap = await self.get(user_id, snapshot_id)
        async with self.vms.locks.hold(snap.vm_id):
            snap = await self.get(user_id, snapshot_id)
            vm = await self.vms.get(user_id, snap.vm_id)
            async with self.vms.sessions() as session:
                count = await repo.count_restorable(session, vm.id)
            if vm.state == State.SNAPSHOTTED and count == 1 and snap.status != FAILED:
                raise Conflict(
                    f"snapshot {snapshot_id} is the only one {vm.id} can resume from; "
                    "restore or delete the vm first"
                )
            await self._delete(vm, snap)

    async def _delete(self, vm: VM, snap: Snapshot) -> None:
        """Its store stops first (if under way), then the row goes (it is never listed
        again), then its frozen files and its artifacts."""
        await self.storing.call_off(snap.id)
        async with self.vms.sessions() as session, session.begin():
            row = await repo.get_snapshot(session, snap.id)
            if row is not None:
                await session.delete(row)
        latest = self._resume_dir(vm.id) / LATEST
        if (await asyncio.to_thread(_read, latest) or "").split(" ")[0] == snap.id:
            await asyncio.to_thread(latest.unlink, True)
        await asyncio.to_thread(frozen.forget, self._frozen_dir(vm.id, snap.id))
        if snap.status == STORED and _old_format(snap):
            try:
                await self.store.delete_prefix(self._prefix(vm.id, snap.id))
            except ArtifactError as exc:
                log.warning("snapshot artifacts left behind", snapshot_id=snap.id, reason=str(exc))
        await self._collect(vm.user_id)
        log.info("snapshot deleted", vm_id=vm.id, snapshot_id=snap.id)

    async def _call_off_stores(self, vm: VM) -> None:
        """Teardown hook of VMService: stores reading the VM's files stop before they go."""
        await self.storing.call_off_vm(vm.id)

    async def _forget_vm(self, vm: VM) -> None:
        """Delete hook of VMService: the VM's snapshots go with it."""
        async with self.vms.sessions() as session, session.begin():
            for snap in await repo.list_snapshots(session, vm.id):
                await session.delete(snap)
        try:
            await self.store.delete_prefix(vm.id)  # old-format snapshots
        except ArtifactError as exc:
            log.warning("snapshot artifacts left behind", vm_id=vm.id, reason=str(exc))
        await self._collect(vm.user_id)

    # ---- start-up ----------------------------------------------------------------------

    async def resume_stores(self) -> None:
        """After reconcile: snapshots a previous hatchd left `storing` are stored again from
        their frozen files when these are intact (all there, from this host boot), and are
        `failed` otherwise (never restored; their VM resumed or stopped as after any failed
        store). Frozen files and unshared copies nothing needs any more are removed."""
        async with self.vms.sessions() as session:
            storing = await repo.storing_snapshots(session)
            vms = {vm.id: vm for vm in await repo.list_vms(session)}
        boot = await asyncio.to_thread(host_boot_id)
        for snap in storing:
            vm = vms.get(snap.vm_id)
            if vm is None:
                continue
            files = await asyncio.to_thread(
                frozen.frozen_files, self._frozen_dir(vm.id, snap.id), ARTIFACT_NAMES, boot
            )
            if files is not None:
                log.info("storing a snapshot again after a restart", snapshot_id=snap.id)
                self._store_in_background(vm, snap.id, snap.automatic)
                continue
            reason = "hatchd stopped while storing it, and its captured files are gone"
            log.error("snapshot failed", vm_id=vm.id, snapshot_id=snap.id, reason=reason)
            async with self.vms.sessions() as session, session.begin():
                await repo.settle_snapshot(
                    session, snap.id, status=FAILED, status_reason=f"storing failed: {reason}"
                )
            await asyncio.to_thread(frozen.forget, self._frozen_dir(vm.id, snap.id))
            await self._after_store(vm.user_id, vm.id, snap.id, reason)
        keep = {snap.id for snap in storing}
        await asyncio.to_thread(self._sweep_frozen, list(vms), keep)

    def _sweep_frozen(self, vm_ids: list[str], keep: set[str]) -> None:
        for vm_id in vm_ids:
            vm_dir = self.vms.vm_dir(vm_id)
            for name in (MEM_NAME, DISK_NAME):  # an unshare cut short
                (vm_dir / f"{name}.unshared").unlink(missing_ok=True)
            storing = vm_dir / frozen.STORING_DIR
            if storing.is_dir():
                for entry in list(storing.iterdir()):
                    if entry.name not in keep:
                        frozen.forget(entry)  # its folder too, once empty

    async def reconcile(self, vm: VM) -> None:
        """Settle a VM the daemon left `snapshotting` or `restoring` when it died, or
        `snapshotted` just before it marked the snapshot complete."""
        vm_dir = self.vms.vm_dir(vm.id)
        resume = self._resume_dir(vm.id)
        vmm = self.vms.vmm
        if vm.state == State.SNAPSHOTTED:
            # Its row is committed: the snapshot is complete; only the hot-copy mark is missing
            # (so the next restore reads the store, which is always safe).
            await asyncio.to_thread((resume / PENDING).unlink, True)
            return
        if vm.state == State.SNAPSHOTTING:
            pending = await asyncio.to_thread(_read, resume / PENDING)
            if pending:
                # Its row was never written: its frozen links (if made) name nothing.
                await asyncio.to_thread(frozen.forget, self._frozen_dir(vm.id, pending))
                with contextlib.suppress(ArtifactError):
                    await self.store.delete_prefix(self._prefix(vm.id, pending))
            if await vmm.alive(vm.id, vm_dir) is not None:
                await self.vms.adopt(vm)  # its console and watch again
                await self._after_failed_capture(vm, "daemon restarted during a snapshot")
            elif pending and (resume / STATE_NAME).exists():
                await self.resume_local(vm, "daemon restarted while storing a snapshot")
            else:
                await asyncio.to_thread(self.vms.drop_memory, vm.id)
                await self.vms.update(
                    vm.id,
                    state=State.STOPPED,
                    state_reason="daemon died during a snapshot; the guest's memory is lost",
                )
            return
        if vm.state == State.RESTORING:
            if await vmm.alive(vm.id, vm_dir) is not None:
                with contextlib.suppress(Exception):
                    await self.vms.adopt(vm, restored=True)  # before it runs on
                    if await vmm.resume_if_paused(vm.id, vm_dir):
                        await asyncio.to_thread(self._forget_previous, vm.id)
                        warning = await self.vms.after_resume(vm)
                        await self.vms.update(vm.id, state=State.RUNNING, state_reason=warning)
                        return
                await vmm.kill(vm.id, vm_dir)
            await self.vms.detach_network(vm)
            prior = await asyncio.to_thread(self._put_back, vm.id)
            if prior is None:  # a restore of the VM's own files: they are still the snapshot
                async with self.vms.sessions() as session:
                    has_snapshots = await repo.count_restorable(session, vm.id) > 0
                prior = State.SNAPSHOTTED if has_snapshots else State.STOPPED
            await self.vms.update(
                vm.id,
                state=prior,
                state_reason="daemon restarted during a restore; the vm is as it was before",
            )
