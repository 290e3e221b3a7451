"""A snapshot returns once the guest is captured; its files are stored in the background.

hatchd is held inside the store (hold point snapshot.storing) for as long as a test needs, so
every behaviour "while storing" is reached for sure: a wake resumes at once on a copy and the
stored snapshot is still exactly the captured state, a restore of another snapshot still
storing waits for it (and so does a fork of it, unless the VM's own files are it), deletes of the
snapshot or the VM are clean, and after a crash the store resumes from intact files or the
snapshot fails and is never restored nor forked."""

from __future__ import annotations

import hashlib
import threading
from pathlib import Path
from typing import Any

import pytest

from hatchvm.client import HatchAPIError
from hatchvm.snapshots.chunks import namespace
from tests.integration.test_snapshots import COUNTER, boot_id, count_of, wait_count
from tests.support.snapshots import rebuild_files
from tests.support.wait import wait_for

pytestmark = pytest.mark.vm


def held_at(daemon_factory: Any, point: str) -> Any:
    d = daemon_factory(HATCH_MAX_SNAPSHOTS_PER_VM="5", HATCH_HOLD_AT=point)
    d.env["HATCH_HOLD_FILE"] = str(d.data_dir / "hold")
    d.start()
    return d


@pytest.fixture
def hatch(daemon_factory):
    """Stores are held before they read a byte, while the hold file exists."""
    return held_at(daemon_factory, "snapshot.storing")


def hold(hatch: Any) -> Path:
    gate = hatch.data_dir / "hold"
    gate.touch()
    return gate


def sha256_of(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as f:
        while block := f.read(4 << 20):
            digest.update(block)
    return digest.hexdigest()


def frozen_dir(hatch: Any, vm: dict, snap: dict) -> Path:
    return hatch.data_dir / "vms" / vm["id"] / "storing" / snap["id"]


def user_store(hatch: Any, user: str) -> list[Path]:
    top = hatch.data_dir / "snapshots" / "users" / namespace(user)
    return [p for p in top.rglob("*") if p.is_file()] if top.exists() else []


def test_a_wake_while_storing_resumes_at_once_and_the_stored_snapshot_is_the_captured_one(
    hatch,
) -> None:
    with hatch.client(hatch.create_key("alice")) as api:
        vm = api.create_vm(user_data=COUNTER, mem_mib=256)
        boot = boot_id(vm)
        before = wait_count(vm, 3)
        gate = hold(hatch)
        snap = api.snapshot_vm(vm["id"])
        assert snap["status"] == "storing" and snap["status_reason"] is None
        assert snap["artifacts"] is None and snap["size_bytes"] == 0
        assert api.get_vm(vm["id"])["state"] == "snapshotted"
        assert [s["status"] for s in api.list_snapshots(vm["id"])] == ["storing"]
        frozen = frozen_dir(hatch, vm, snap) / "mem"
        captured = sha256_of(frozen)

        # The wake resumes from the VM's own files while the store is still held.
        assert api.restore_vm(vm["id"])["state"] == "running"
        assert api.get_snapshot(snap["id"])["status"] == "storing"
        assert boot_id(vm) == boot
        wait_count(vm, before + 5)
        live = hatch.data_dir / "vms" / vm["id"] / "mem"
        # The guest wrote into its RAM file (so a store reading it would be torn) ...
        assert sha256_of(live) != captured
        # ... which is a copy: the file being stored is still the captured bytes.
        assert not live.samefile(frozen) and sha256_of(frozen) == captured

        gate.unlink()
        stored = api.wait_stored(snap["id"])
        assert stored["status"] == "stored" and stored["size_bytes"] > 0
        assert set(stored["artifacts"]) == {"mem", "disk", "state"}
        # Its frozen links go just after its row settles (never before: a crash between
        # must find them).
        wait_for(lambda: not frozen_dir(hatch, vm, snap).exists(), 30, "frozen links gone")
        files = rebuild_files(hatch, snap["id"], hatch.data_dir / "check")
        assert sha256_of(files["mem"]) == captured

        # And it restores from the store to the captured guest.
        high = count_of(vm)
        api.snapshot_vm(vm["id"], wait_stored=True)
        assert api.restore_vm(vm["id"], snap["id"])["state"] == "running"
        assert boot_id(vm) == boot
        assert count_of(vm) < high


def test_restoring_another_snapshot_still_storing_waits_until_it_is_stored(hatch) -> None:
    with hatch.client(hatch.create_key("alice")) as api:
        vm = api.create_vm(user_data=COUNTER, mem_mib=256)
        boot = boot_id(vm)
        wait_count(vm, 3)
        gate = hold(hatch)
        first = api.snapshot_vm(vm["id"])
        api.restore_vm(vm["id"])
        high = wait_count(vm, count_of(vm) + 10)
        second = api.snapshot_vm(vm["id"])
        assert {s["status"] for s in api.list_snapshots(vm["id"])} == {"storing"}

        answers: list[Any] = []

        def restore_first() -> None:
            try:
                answers.append(api.restore_vm(vm["id"], first["id"]))
            except Exception as exc:
                answers.append(exc)

        worker = threading.Thread(target=restore_first)
        worker.start()
        wait_for(
            lambda: "restore waits for its snapshot" in hatch.log_tail(400) or answers,
            60,
            "the restore waiting",
        )
        assert worker.is_alive() and answers == []
        gate.unlink()
        worker.join(300)
        assert answers and answers[0]["state"] == "running"
        assert api.get_snapshot(first["id"])["status"] == "stored"
        assert boot_id(vm) == boot
        assert count_of(vm) < high  # the first snapshot's guest, from the store
        assert api.wait_stored(second["id"])["status"] == "stored"


def test_forks_of_a_snapshot_still_storing_start_from_the_captured_guest(hatch) -> None:
    with hatch.client(hatch.create_key("alice")) as api:
        vm = api.create_vm(user_data=COUNTER, mem_mib=256)
        boot = boot_id(vm)
        wait_count(vm, 3)
        gate = hold(hatch)
        snap = api.snapshot_vm(vm["id"])
        captured = sha256_of(frozen_dir(hatch, vm, snap) / "mem")

        # The VM sleeps on its own files, which are the snapshot: a fork starts from them at
        # once, while the store is still held.
        (hot,) = api.fork_snapshot(snap["id"])
        assert hot["state"] == "running" and boot_id(hot) == boot
        assert api.get_snapshot(snap["id"])["status"] == "storing"

        # Once the VM runs on, its files are no longer the snapshot: a fork waits for the store.
        api.restore_vm(vm["id"])
        high = wait_count(vm, count_of(vm) + 50)
        answers: list[Any] = []

        def fork() -> None:
            try:
                answers.append(api.fork_snapshot(snap["id"]))
            except Exception as exc:
                answers.append(exc)

        worker = threading.Thread(target=fork)
        worker.start()
        wait_for(
            lambda: "fork waits for its snapshot" in hatch.log_tail(400) or answers,
            60,
            "the fork waiting",
        )
        assert worker.is_alive() and answers == []
        gate.unlink()
        worker.join(300)
        assert answers and isinstance(answers[0], list), answers
        (cold,) = answers[0]
        assert cold["state"] == "running" and boot_id(cold) == boot
        assert count_of(cold) < high  # the captured guest, not the one that ran on
        assert api.get_snapshot(snap["id"])["status"] == "stored"
        # Neither fork, nor the VM running on, changed what was stored.
        files = rebuild_files(hatch, snap["id"], hatch.data_dir / "check")
        assert sha256_of(files["mem"]) == captured
        for child in (hot, cold):
            api.delete_vm(child["id"])


def test_deleting_the_snapshot_or_the_vm_while_storing_is_clean(daemon_factory) -> None:
    hatch = held_at(daemon_factory, "snapshot.packed")  # held once its chunks are written
    with hatch.client(hatch.create_key("alice")) as api:
        vm = api.create_vm(user_data=COUNTER, mem_mib=256)
        wait_count(vm, 3)
        gate = hold(hatch)
        first = api.snapshot_vm(vm["id"])
        wait_for(lambda: hatch.log_tail(200).count("hold point reached") == 1, 300, "packed")
        api.restore_vm(vm["id"])
        wait_count(vm, count_of(vm) + 5)
        second = api.snapshot_vm(vm["id"])
        wait_for(lambda: hatch.log_tail(200).count("hold point reached") == 2, 300, "packed")
        written = set(user_store(hatch, "alice"))
        assert written  # both stores wrote their packs and wait before their listings
        assert frozen_dir(hatch, vm, first).exists() and frozen_dir(hatch, vm, second).exists()

        api.delete_snapshot(first["id"])
        assert [s["id"] for s in api.list_snapshots(vm["id"])] == [second["id"]]
        assert api.get_snapshot(second["id"])["status"] == "storing"
        assert not frozen_dir(hatch, vm, first).exists()
        left = set(user_store(hatch, "alice"))
        assert left and left < written  # the first's own packs went; the second's are pinned
        # The only snapshot the VM can resume from cannot go while the VM sleeps on it.
        with pytest.raises(HatchAPIError) as refused:
            api.delete_snapshot(second["id"])
        assert refused.value.status == 409

        api.delete_vm(vm["id"])
        assert not (hatch.data_dir / "vms" / vm["id"]).exists()
        assert user_store(hatch, "alice") == []
        gate.unlink()
        # The stores called off ended quietly: nothing failed, nothing was left.
        log = hatch.log_tail(400)
        assert "snapshot store failed" not in log and "Traceback" not in log


@pytest.mark.parametrize("files", ["intact", "lost"])
def test_after_a_crash_while_storing_the_store_resumes_or_the_snapshot_fails(hatch, files) -> None:
    key = hatch.create_key("alice")
    with hatch.client(key) as api:
        vm = api.create_vm(user_data=COUNTER, mem_mib=256)
        boot = boot_id(vm)
        wait_count(vm, 3)
    hatch.stop()
    hatch.env["HATCH_CRASH_AT"] = "snapshot.packed"
    hatch.start()
    with hatch.client(key) as api:
        snap = api.snapshot_vm(vm["id"])  # returns; the store then dies with hatchd
        assert hatch.proc is not None
        hatch.proc.wait(300)
    assert '"point": "snapshot.packed"' in hatch.log_tail(20)
    del hatch.env["HATCH_CRASH_AT"]
    if files == "lost":
        for path in frozen_dir(hatch, vm, snap).iterdir():
            path.unlink()
    hatch.start()
    with hatch.client(key) as api:
        settled = api.wait_stored(snap["id"])
        if files == "intact":
            assert settled["status"] == "stored"
            assert api.get_vm(vm["id"])["state"] == "snapshotted"
            assert api.restore_vm(vm["id"])["state"] == "running"
        else:
            assert settled["status"] == "failed"
            assert "captured files are gone" in settled["status_reason"]
            assert settled["artifacts"] is None
            # Never restored; the VM resumed from its own files, as after any failed store.
            vm_now = wait_for(
                lambda: (v := api.get_vm(vm["id"]))["state"] == "running" and v, 120, "resumed"
            )
            assert "storing snapshot" in vm_now["state_reason"]
            later = api.snapshot_vm(vm["id"], wait_stored=True)
            assert later["status"] == "stored"
            # The default is the latest restorable snapshot; the failed one is refused.
            with pytest.raises(HatchAPIError) as refused:
                api.restore_vm(vm["id"], snap["id"])
            assert refused.value.status == 409 and "cannot be restored" in refused.value.message
            with pytest.raises(HatchAPIError) as refused:  # nor forked
                api.fork_snapshot(snap["id"])
            assert refused.value.status == 409 and "cannot be forked" in refused.value.message
            assert api.get_vm(vm["id"])["state"] == "snapshotted"
            assert api.list_vms() == [api.get_vm(vm["id"])]  # no child was made
            api.delete_snapshot(snap["id"])
            assert [s["id"] for s in api.list_snapshots(vm["id"])] == [later["id"]]
            assert api.restore_vm(vm["id"])["state"] == "running"
        assert boot_id(vm) == boot
        storing = hatch.data_dir / "vms" / vm["id"] / "storing"
        wait_for(lambda: not any(storing.glob("*")), 30, "frozen links gone")
