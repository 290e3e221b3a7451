"""The chunk store end to end: pages shared between the snapshots and the VMs of one user but
never across users, the quota counting what a user holds once, collection after deletes, a
daemon killed while storing or collecting, and old-format snapshots still restoring."""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from hatchvm.db import repo
from hatchvm.snapshots.chunks import namespace
from hatchvm.snapshots.manifest import SnapshotManifest
from tests.integration.test_snapshots import COUNTER, boot_id, count_of, wait_count
from tests.support.snapshots import _in_db, make_old_format, manifest_of
from tests.support.wait import wait_http

pytestmark = pytest.mark.vm

# COUNTER, plus 128 MiB of fresh random data in a tmpfs, written at boot: every VM of this
# script holds its own random pages, which no other VM shares. New pages fill packs of
# PACK_RAW (32 MiB) in address order, so a pack holds only random pages if a run of them covers
# it whole: 48 MiB (this test's first size) did so only when the packs' boundaries fell right,
# which made it flaky; 128 MiB holds at least two whole packs wherever the boundaries fall.
NOISY = COUNTER.replace(
    "busybox httpd -p 8080 -h /srv/www\n",
    "busybox httpd -p 8080 -h /srv/www\n"
    "mkdir -p /noise && mount -t tmpfs -o size=160m tmpfs /noise\n"
    "head -c 134217728 /dev/urandom > /noise/random && echo yes > /srv/www/noisy\n",
)


@pytest.fixture
def hatch(daemon_factory):
    d = daemon_factory(HATCH_MAX_SNAPSHOTS_PER_VM="5")
    d.start()
    return d


def rows(hatch: Any, user: str) -> list[SnapshotManifest]:
    async def work(session: Any) -> list[str]:
        snaps = await repo.user_snapshots(session, user)
        return [row.manifest for row in snaps if row.status == "stored"]  # others name nothing

    return [SnapshotManifest.parse(text) for text in asyncio.run(_in_db(hatch, work))]


def quota_bytes(hatch: Any, user: str) -> int:
    async def work(session: Any) -> int:
        return await repo.snapshot_bytes(session, user)

    return int(asyncio.run(_in_db(hatch, work)))


def user_files(hatch: Any, user: str) -> dict[str, int]:
    top = hatch.data_dir / "snapshots" / "users" / namespace(user)
    return {p.name: p.stat().st_size for p in top.rglob("*") if p.is_file()} if top.exists() else {}


def named_files(hatch: Any, user: str) -> set[str]:
    """What the user's chunk-store snapshot rows name: packs, their indexes, listings."""
    named: set[str] = set()
    for manifest in rows(hatch, user):
        if manifest.chunks is not None:
            named.add(Path(manifest.chunks.listing_key).name)
            named |= {f"{p}.{ext}" for p in manifest.chunks.packs for ext in ("pack", "idx")}
    return named


def named_bytes(hatch: Any, user: str) -> int:
    files = user_files(hatch, user)
    return sum(files[name] for name in named_files(hatch, user))


def assert_store_matches_rows(hatch: Any, user: str) -> None:
    """The user's store holds exactly what their snapshot rows name: every named pack (and
    its index) and listing is there, and nothing else is."""
    assert set(user_files(hatch, user)) == named_files(hatch, user)


def drop_hot_copy(hatch: Any, vm: dict) -> None:
    """Forget that the VM's own files equal its latest snapshot: the next restore reads the
    store (as after a host reboot)."""
    (hatch.data_dir / "vms" / vm["id"] / "resume" / "snapshot_id").unlink()


def test_pages_are_shared_within_a_user_and_never_across_users(hatch) -> None:
    with hatch.client(hatch.create_key("alice")) as alice:
        one = alice.create_vm(user_data=COUNTER, mem_mib=256)
        two = alice.create_vm(user_data=COUNTER, mem_mib=256)
        wait_count(one, 3)
        wait_count(two, 3)
        first = alice.snapshot_vm(one["id"], wait_stored=True)
        alice.restore_vm(one["id"])
        second = alice.snapshot_vm(one["id"], wait_stored=True)  # the same VM, a moment later
        other = alice.snapshot_vm(
            two["id"], wait_stored=True
        )  # another VM of the same user and image
        # The second snapshot adds its few changed pages and its listing; the other VM shares
        # the kernel's, the image's and the page cache's pages with the first.
        assert second["size_bytes"] <= first["size_bytes"] // 10
        assert other["size_bytes"] <= first["size_bytes"] // 2
        # Every byte alice's store holds was added by one of her snapshots, counted once.
        held = sum(user_files(hatch, "alice").values())
        assert held == sum(s["size_bytes"] for s in (first, second, other))
        assert quota_bytes(hatch, "alice") == held
        # Each snapshot's artifacts still say what a restore of it reads.
        assert sum(a["size_bytes"] for a in other["artifacts"].values()) > other["size_bytes"]
        assert_store_matches_rows(hatch, "alice")

    with hatch.client(hatch.create_key("bob")) as bob:
        vm = bob.create_vm(user_data=COUNTER, mem_mib=256)
        wait_count(vm, 3)
        own = bob.snapshot_vm(vm["id"], wait_stored=True)
    # Bob's snapshot of the same image shares nothing with alice's: it stores it all.
    assert own["size_bytes"] > first["size_bytes"] // 2
    bob_packs = manifest_of(hatch, own["id"]).chunks.packs  # type: ignore[union-attr]
    alice_packs = {p for m in rows(hatch, "alice") for p in m.chunks.packs}  # type: ignore[union-attr]
    assert not set(bob_packs) & alice_packs
    assert sum(user_files(hatch, "bob").values()) == own["size_bytes"] == quota_bytes(hatch, "bob")
    assert quota_bytes(hatch, "alice") == held  # untouched by bob


def packs(hatch: Any, snap: dict) -> set[str]:
    chunks = manifest_of(hatch, snap["id"]).chunks
    assert chunks is not None
    return set(chunks.packs)


def test_deletes_collect_what_nothing_names(hatch) -> None:
    with hatch.client(hatch.create_key("alice")) as api:
        noisy = api.create_vm(user_data=NOISY, mem_mib=384)  # 128 MiB of pages all its own
        quiet = api.create_vm(user_data=COUNTER, mem_mib=256)
        boot = boot_id(quiet)
        wait_http(f"http://{noisy['guest_ip']}:8080/noisy")
        wait_count(quiet, 3)
        first = api.snapshot_vm(noisy["id"], wait_stored=True)
        api.restore_vm(noisy["id"])
        second = api.snapshot_vm(noisy["id"], wait_stored=True)
        kept = api.snapshot_vm(quiet["id"], wait_stored=True)
        assert_store_matches_rows(hatch, "alice")

        # The second snapshot goes: its listing and the packs only it named.
        only_second = packs(hatch, second) - packs(hatch, first) - packs(hatch, kept)
        api.delete_snapshot(second["id"])
        assert_store_matches_rows(hatch, "alice")
        assert not {f"{p}.pack" for p in only_second} & set(user_files(hatch, "alice"))

        # The noisy VM goes: its random pages with it; what the quiet VM shares with it stays.
        only_noisy = packs(hatch, first) - packs(hatch, kept)
        shared = packs(hatch, first) & packs(hatch, kept)
        assert only_noisy, f"all {len(packs(hatch, first))} packs of the noisy VM are shared"
        assert shared
        before = quota_bytes(hatch, "alice")
        api.delete_vm(noisy["id"])
        assert_store_matches_rows(hatch, "alice")
        assert {f"{p}.pack" for p in shared} <= set(user_files(hatch, "alice"))
        assert quota_bytes(hatch, "alice") == sum(user_files(hatch, "alice").values()) < before

        drop_hot_copy(hatch, quiet)
        assert api.restore_vm(quiet["id"])["state"] == "running"  # from the store
        assert boot_id(quiet) == boot
        api.delete_vm(quiet["id"])
    assert user_files(hatch, "alice") == {}


def _crash(hatch: Any, key: str, point: str, call: Callable[[Any], object]) -> None:
    """Run call with hatchd set to die at point, then start hatchd again."""
    hatch.stop()
    hatch.env["HATCH_CRASH_AT"] = point
    hatch.start()
    with hatch.client(key) as api:

        def run() -> None:
            try:
                call(api)
            except Exception:
                pass  # the daemon dies under it

        worker = threading.Thread(target=run)
        worker.start()
        assert hatch.proc is not None
        hatch.proc.wait(180)
        worker.join(180)
    assert f'"point": "{point}"' in hatch.log_tail(20)
    del hatch.env["HATCH_CRASH_AT"]
    hatch.start()


@pytest.mark.parametrize("point", ["snapshot.packed", "snapshot.stored", "gc.sweeping"])
def test_a_daemon_killed_while_storing_or_collecting_leaves_nothing_dangling(hatch, point) -> None:
    key = hatch.create_key("alice")
    with hatch.client(key) as api:
        vm = api.create_vm(user_data=COUNTER, mem_mib=256)
        boot = boot_id(vm)
        wait_count(vm, 3)
        first = api.snapshot_vm(vm["id"], wait_stored=True)
        api.restore_vm(vm["id"])
        if point == "gc.sweeping":
            second = api.snapshot_vm(vm["id"], wait_stored=True)
            api.restore_vm(vm["id"])
            api.snapshot_vm(vm["id"], wait_stored=True)
            _crash(hatch, key, point, lambda api: api.delete_snapshot(second["id"]))
        else:
            wait_count(vm, count_of(vm) + 3)  # a few changed pages: new chunks to write
            _crash(hatch, key, point, lambda api: api.snapshot_vm(vm["id"], wait_stored=True))
    with hatch.client(key) as api:
        state = api.get_vm(vm["id"])["state"]
        assert state in ("running", "snapshotted")
        # A snapshot whose store was cut short is stored again from its intact files.
        for snap in api.list_snapshots(vm["id"]):
            assert api.wait_stored(snap["id"])["status"] == "stored"
        # Start-up collected what the dead daemon left; every listed snapshot is whole.
        assert_store_matches_rows(hatch, "alice")
        if state == "snapshotted":
            api.restore_vm(vm["id"])
        assert boot_id(vm) == boot
        api.snapshot_vm(vm["id"], wait_stored=True)
        assert api.restore_vm(vm["id"], first["id"])["state"] == "running"  # from the store
        assert boot_id(vm) == boot
        wait_count(vm, 0)


def test_an_old_format_snapshot_still_restores_and_deletes(hatch) -> None:
    with hatch.client(hatch.create_key("alice")) as api:
        vm = api.create_vm(user_data=COUNTER, mem_mib=256)
        boot = boot_id(vm)
        wait_count(vm, 3)
        first = api.snapshot_vm(vm["id"], wait_stored=True)
        api.restore_vm(vm["id"])
        high = wait_count(vm, count_of(vm) + 20)
        second = api.snapshot_vm(vm["id"], wait_stored=True)
        # As an older hatchd stored it: one zstd file per artifact, manifest version 1.
        make_old_format(hatch, first["id"])
        old = api.get_snapshot(first["id"])
        folder = hatch.data_dir / "snapshots" / vm["id"] / first["id"]
        assert old["storage"]["location"] == str(folder)
        assert (folder / "mem.zst").exists()

        assert api.restore_vm(vm["id"], first["id"])["state"] == "running"
        assert boot_id(vm) == boot
        assert count_of(vm) < high  # the older memory came back
        third = api.snapshot_vm(
            vm["id"], wait_stored=True
        )  # and the VM snapshots into the chunk store again
        # The quota counts the old one whole and the others' packs and listings once.
        assert quota_bytes(hatch, "alice") == old["size_bytes"] + named_bytes(hatch, "alice")
        assert {s["id"] for s in api.list_snapshots(vm["id"])} == {
            first["id"],
            second["id"],
            third["id"],
        }

        api.delete_snapshot(first["id"])
        assert not folder.exists()
        assert_store_matches_rows(hatch, "alice")
