"""Snapshots end to end: real hatchd, real QEMU guests frozen to a store and resumed."""

from __future__ import annotations

import socket
import subprocess
import threading
from pathlib import Path

import pytest

from hatchvm.client import HatchAPIError
from hatchvm.net.alloc import tap_name
from hatchvm.snapshots.chunks import namespace, pack_key
from tests.support.host import asleep, qemu_pids
from tests.support.snapshots import manifest_of, rebuild_files
from tests.support.wait import http_text, wait_for, wait_http

pytestmark = pytest.mark.vm

# A counter kept in the shell's memory, appended to a log on the VM's disk five times a
# second, an HTTP server publishing both, and a TCP echo server. The counter starts from the
# log's last line, so only a resumed guest (same boot_id) continues without a new boot.
# Each value is synced to the disk before it is published, so a published value is on the
# disk; an unsynced write lives only in the guest's page cache, which the memory artifact holds.
COUNTER = """#!/bin/sh
mkdir -p /srv/www
cat /proc/sys/kernel/random/boot_id > /srv/www/boot_id
busybox httpd -p 8080 -h /srv/www
(while :; do busybox nc -l -p 7000 -e /bin/cat; done) >/dev/null 2>&1 &
(
  i=$(tail -n 1 /srv/www/log 2>/dev/null); i=${i:-0}
  while :; do
    i=$((i + 1))
    echo $i >> /srv/www/log
    sync
    echo $i > /srv/www/count.new && mv /srv/www/count.new /srv/www/count
    sleep 0.2
  done
) >/dev/null 2>&1 &
"""


def count_of(vm: dict) -> int:
    return int(wait_http(f"http://{vm['guest_ip']}:8080/count").strip())


def wait_count(vm: dict, above: int, timeout: float = 120) -> int:
    def check() -> int | None:
        text = http_text(f"http://{vm['guest_ip']}:8080/count")
        return int(text) if text and int(text) > above else None

    return wait_for(check, timeout, f"the guest's counter above {above}")


def assert_consecutive(log: str) -> list[int]:
    numbers = [int(line) for line in log.split()]
    assert numbers, "the counter log is empty"
    assert numbers == list(range(1, len(numbers) + 1)), "the counter log has gaps or repeats"
    return numbers


def boot_id(vm: dict) -> str:
    return wait_http(f"http://{vm['guest_ip']}:8080/boot_id").strip()


def echo(conn: socket.socket, text: str) -> str:
    conn.sendall(text.encode() + b"\n")
    got = b""
    while not got.endswith(b"\n"):
        piece = conn.recv(100)
        if not piece:
            break
        got += piece
    return got.decode().strip()


def connect_echo(vm: dict) -> socket.socket:
    def attempt() -> socket.socket | None:
        conn = socket.create_connection((vm["guest_ip"], 7000), timeout=5)
        try:
            if echo(conn, "hello") == "hello":
                return conn
        except OSError:
            pass
        conn.close()
        return None

    return wait_for(attempt, 60, "the guest's echo server")


def disk_file(disk: Path, path: str) -> str:
    """A file of the VM's writable disk (its overlay upper layer), read without the guest.

    The guest's ext4 journal is replayed first (on this copy): what the guest synced may so far
    sit only in the journal, and debugfs reads the filesystem without replaying it."""
    replay = subprocess.run(
        ["e2fsck", "-E", "journal_only", "-y", str(disk)], capture_output=True, text=True
    )
    assert replay.returncode in (0, 1), f"e2fsck could not replay the journal: {replay.stdout}"
    out = subprocess.run(
        ["debugfs", "-R", f"cat /upper{path}", str(disk)],
        capture_output=True,
        text=True,
        check=True,
    )
    return out.stdout


def unpack_disk(hatch, snap: dict, dest: Path) -> Path:
    """Fetch and verify a local snapshot's disk from its chunks, as a restore would."""
    return rebuild_files(hatch, snap["id"], dest)["disk"]


@pytest.fixture
def hatch(daemon_factory):
    d = daemon_factory(HATCH_MAX_SNAPSHOTS_PER_VM="2")
    d.start()
    return d


def test_snapshot_and_restore_resume_exactly(api, hatch, tmp_path) -> None:
    vm = api.create_vm(user_data=COUNTER, mem_mib=256)
    boot = boot_id(vm)
    wait_count(vm, 3)
    conn = connect_echo(vm)
    before = count_of(vm)

    snap = api.snapshot_vm(vm["id"], wait_stored=True)
    assert snap["id"].startswith("snap_") and snap["vm_id"] == vm["id"]
    assert snap["automatic"] is False and snap["size_bytes"] > 0
    assert snap["storage"]["backend"] == "local"
    assert set(snap["artifacts"]) == {"mem", "disk", "state"}
    # Memory and disk are sparse-aware: far smaller than the 256 MiB of RAM plus the disk.
    assert snap["artifacts"]["mem"]["raw_bytes"] == 256 << 20
    assert snap["size_bytes"] < 128 << 20

    frozen = api.get_vm(vm["id"])
    assert frozen["state"] == "snapshotted"
    for field in ("guest_ip", "guest_mac", "ssh_port"):
        assert frozen[field] == vm[field]
    assert asleep(vm["id"], tap_name(hatch.tap_prefix, vm["id"]))  # no CPU, no guest memory
    with pytest.raises(HatchAPIError) as err:
        api.snapshot_vm(vm["id"], wait_stored=True)
    assert (err.value.status, err.value.message) == (409, "vm is snapshotted, must be running")
    with pytest.raises(HatchAPIError) as err:
        api.start_vm(vm["id"])
    assert err.value.status == 409

    # The disk was captured with the memory: the log on it reaches the counter's value.
    disk = disk_file(unpack_disk(hatch, snap, tmp_path), "/srv/www/log")
    at_snapshot = assert_consecutive(disk)[-1]
    assert at_snapshot >= before

    restored = api.restore_vm(vm["id"])
    assert restored["state"] == "running"
    assert (restored["guest_ip"], restored["guest_mac"]) == (vm["guest_ip"], vm["guest_mac"])
    assert echo(conn, "still there") == "still there"  # the same TCP connection
    conn.close()
    assert boot_id(vm) == boot  # resumed, not rebooted
    after = wait_count(vm, at_snapshot + 5)
    log = wait_http(f"http://{vm['guest_ip']}:8080/log")
    assert assert_consecutive(log)[-1] >= after  # counted on from where it was, no restart

    with pytest.raises(HatchAPIError) as err:
        api.restore_vm(vm["id"])
    assert (err.value.status, err.value.message) == (409, "vm is running, must be snapshotted")
    assert [s["id"] for s in api.list_snapshots(vm["id"])] == [snap["id"]]  # not consumed
    assert api.get_snapshot(snap["id"]) == snap


@pytest.mark.postgres
def test_older_snapshot_by_id_quota_and_delete(api, hatch) -> None:
    vm = api.create_vm(user_data=COUNTER, mem_mib=256)
    boot = boot_id(vm)
    wait_count(vm, 3)
    first = api.snapshot_vm(vm["id"], wait_stored=True)
    api.restore_vm(vm["id"])
    high = wait_count(vm, count_of(vm) + 40)
    second = api.snapshot_vm(vm["id"], wait_stored=True)
    assert [s["id"] for s in api.list_snapshots(vm["id"])] == [second["id"], first["id"]]

    with pytest.raises(HatchAPIError) as err:
        api.restore_vm(vm["id"], "snap_doesnotexist")
    assert err.value.status == 404
    response = api.request("POST", f"/vms/{vm['id']}/restore", json={"snapshot_id": 5})
    assert response.status_code == 400 and "snapshot_id" in response.json()["error"]

    api.restore_vm(vm["id"], first["id"])
    assert boot_id(vm) == boot
    # The older memory and disk came back: the counter is below where the second one was.
    assert count_of(vm) < high
    assert_consecutive(wait_http(f"http://{vm['guest_ip']}:8080/log"))

    with pytest.raises(HatchAPIError) as err:
        api.snapshot_vm(vm["id"], wait_stored=True)
    assert (err.value.status, err.value.message) == (403, "snapshot limit reached (2/2)")
    assert api.get_vm(vm["id"])["state"] == "running"

    assert api.delete_snapshot(second["id"]) == {"status": "deleted"}
    with pytest.raises(HatchAPIError) as err:
        api.get_snapshot(second["id"])
    assert err.value.status == 404
    assert not Path(second["storage"]["location"]).exists()
    third = api.snapshot_vm(vm["id"], wait_stored=True)
    assert [s["id"] for s in api.list_snapshots(vm["id"])] == [third["id"], first["id"]]


def test_corrupted_or_missing_chunk_is_refused_and_retryable(api, hatch) -> None:
    vm = api.create_vm(user_data=COUNTER, mem_mib=256)
    booted = boot_id(vm)
    wait_count(vm, 3)
    first = api.snapshot_vm(vm["id"], wait_stored=True)

    # It sleeps on its own files (first's). A device state there that QEMU cannot load is
    # logged with QEMU's own reason, and the VM is restored from the stored snapshot instead.
    state = hatch.data_dir / "vms" / vm["id"] / "resume" / "state"
    state.write_bytes(state.read_bytes()[:4096])
    assert api.restore_vm(vm["id"])["state"] == "running"
    (failed,) = hatch.events("restore failed", vm["id"])
    assert "qemu said: " in failed["reason"], failed
    assert hatch.events("restoring from the stored snapshot instead", vm["id"])
    assert boot_id(vm) == booted  # resumed, not booted again
    second = api.snapshot_vm(vm["id"], wait_stored=True)

    # The largest pack of the first snapshot (the second names it too: they share pages).
    chunks = manifest_of(hatch, first["id"]).chunks
    assert chunks is not None
    pack = max(chunks.packs, key=lambda p: chunks.packs[p].size)
    path = hatch.data_dir / "snapshots" / pack_key(namespace("alice"), pack)
    good = path.read_bytes()
    damaged = bytearray(good)
    damaged[len(damaged) // 2] ^= 0xFF
    path.write_bytes(bytes(damaged))
    with pytest.raises(HatchAPIError) as err:
        api.restore_vm(vm["id"], first["id"])
    assert err.value.status == 500 and first["id"] in err.value.message
    assert "checksum" in err.value.message or "corrupt" in err.value.message
    assert pack in err.value.message
    assert api.get_vm(vm["id"])["state"] == "snapshotted"

    path.unlink()
    with pytest.raises(HatchAPIError) as err:
        api.restore_vm(vm["id"], first["id"])
    assert err.value.status == 500 and first["id"] in err.value.message
    assert "missing" in err.value.message
    assert api.get_vm(vm["id"])["state"] == "snapshotted"

    path.write_bytes(good)  # repaired: the same request now succeeds
    assert api.restore_vm(vm["id"], first["id"])["state"] == "running"
    wait_count(vm, 0)
    assert second["id"] in [s["id"] for s in api.list_snapshots(vm["id"])]


def test_delete_cascade_and_ownership(api, hatch) -> None:
    vm = api.create_vm(user_data=COUNTER, mem_mib=256)
    wait_count(vm, 1)
    first = api.snapshot_vm(vm["id"], wait_stored=True)
    with pytest.raises(HatchAPIError) as err:
        api.delete_snapshot(first["id"])  # the only way back for a snapshotted VM
    assert err.value.status == 409
    api.restore_vm(vm["id"])
    second = api.snapshot_vm(vm["id"], wait_stored=True)

    with hatch.client(hatch.create_key("mallory")) as other:
        for call in (
            lambda: other.get_snapshot(first["id"]),
            lambda: other.delete_snapshot(first["id"]),
            lambda: other.list_snapshots(vm["id"]),
            lambda: other.restore_vm(vm["id"]),
            lambda: other.snapshot_vm(vm["id"], wait_stored=True),
        ):
            with pytest.raises(HatchAPIError) as err:
                call()
            assert err.value.status == 404

    user = hatch.data_dir / "snapshots" / "users" / namespace("alice")
    store = user / "manifests" / vm["id"]
    assert store.is_dir() and list((user / "packs").iterdir())
    assert api.delete_vm(vm["id"]) == {"status": "deleted"}
    for snap in (first, second):
        with pytest.raises(HatchAPIError) as err:
            api.get_snapshot(snap["id"])
        assert err.value.status == 404
    assert not store.exists()
    assert [p for p in user.rglob("*") if p.is_file()] == []  # alice has no snapshot left
    assert not (hatch.data_dir / "vms" / vm["id"]).exists()
    assert qemu_pids(vm["id"]) == []


def test_snapshot_daemon_restart_restore(api, hatch) -> None:
    vm = api.create_vm(user_data=COUNTER, mem_mib=256)
    boot = boot_id(vm)
    count = wait_count(vm, 3)
    snap = api.snapshot_vm(vm["id"], wait_stored=True)
    hatch.kill()
    hatch.start()
    assert api.get_vm(vm["id"])["state"] == "snapshotted"
    assert [s["id"] for s in api.list_snapshots(vm["id"])] == [snap["id"]]
    assert api.restore_vm(vm["id"])["state"] == "running"
    assert boot_id(vm) == boot
    assert wait_count(vm, count) > count


@pytest.mark.parametrize("phase", ["snapshotting", "restoring"])
def test_daemon_killed_mid_operation_leaves_a_consistent_vm(api, hatch, phase) -> None:
    vm = api.create_vm(user_data=COUNTER, mem_mib=256)
    boot = boot_id(vm)
    wait_count(vm, 3)
    if phase == "restoring":
        api.snapshot_vm(vm["id"], wait_stored=True)
        api.restore_vm(vm["id"])
        api.snapshot_vm(vm["id"], wait_stored=True)
        older = api.list_snapshots(vm["id"])[-1]["id"]  # not the hot copy: a slower restore
        call = lambda: api.restore_vm(vm["id"], older)  # noqa: E731
    else:
        call = lambda: api.snapshot_vm(vm["id"], wait_stored=True)  # noqa: E731

    def request() -> None:
        try:
            call()
        except Exception:
            pass  # the daemon dies under it

    worker = threading.Thread(target=request)
    worker.start()
    # Kill it while the VM is in that state (or, if the operation won the race, just after).
    wait_for(
        lambda: api.get_vm(vm["id"])["state"] == phase or not worker.is_alive(),
        120,
        f"state {phase}",
    )
    hatch.kill()
    worker.join(30)
    hatch.start()

    state = api.get_vm(vm["id"])["state"]
    assert state in ("running", "snapshotted")
    snapshots = api.list_snapshots(vm["id"])
    for snap in snapshots:  # every listed snapshot is, or becomes, complete
        # Its captured files were intact: its store resumed after the restart.
        assert api.wait_stored(snap["id"])["status"] == "stored"
        rebuild_files(hatch, snap["id"], hatch.data_dir / "check" / snap["id"])
    if state == "snapshotted":
        assert snapshots
        api.restore_vm(vm["id"])
    assert boot_id(vm) == boot  # resumed either way, never rebooted
    last = count_of(vm)
    assert wait_count(vm, last) > last
