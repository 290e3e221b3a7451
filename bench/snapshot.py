"""Benchmark: snapshot and restore of a 512 MiB VM whose guest has touched about half its memory.

Measured in one run, against baselines on the same files and the same guest state:
  snapshot: hatchd's POST /vms/{id}/snapshot (it returns once the guest is captured) against
            a plain QMP `migrate` of the same guest's RAM to a file (timed on the raw QEMU of
            the restore baseline, each round); the time until it is stored (in the
            background) against `gzip -6` of the raw memory and disk files (what the Go
            reference implementation does);
  restore:  POST /vms/{id}/restore until the guest answers HTTP, against a raw
            `qemu -incoming "exec:cat stream"` of the uncompressed migration stream;
  chunks:   what a second snapshot of the VM (idle in between) adds; what --vms VMs of one
            user with the same workload store together, against each stored alone (in a
            chunk store of its own, and in the old per-artifact format); rebuilding the files
            from the store against the old format's whole-file decode (in-process, and end to
            end to HTTP); on S3 (a SeaweedFS server started here), a restore that streams
            from the bucket against a hot restore of the same VM.

Run as root: `.venv/bin/python bench/snapshot.py [--rounds N]`. It enters a fresh network
namespace of its own, so its bridge, TAPs and VMs vanish with it.
"""

from __future__ import annotations

import argparse
import asyncio
import shlex
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.answers import first_answer, standby_ready, stored
from bench.chunk_store import cold_restores, decode_against_restore, s3_streaming, ten_vms
from hatchvm.core.vms import DISK_NAME, MEM_NAME
from hatchvm.net import firewall, links
from hatchvm.net.alloc import tap_name
from hatchvm.vmm.base import VMMError
from hatchvm.vmm.qmp import qmp_session
from tests.support.daemon import HatchDaemon
from tests.support.image import ensure_test_image
from tests.support.netns import enter_fresh_netns, in_initial_netns

MEM_MIB = 512


def workload(touch_mib: int) -> str:
    """The guest fills a tmpfs with copies of its own files (programs, libraries, text: what
    a guest's memory holds) up to touch_mib, then publishes "filled" over HTTP."""
    return f"""#!/bin/sh
mkdir -p /srv/www /fill
mount -t tmpfs -o size={touch_mib + 16}m tmpfs /fill
busybox httpd -p 8080 -h /srv/www
(
  i=0
  while [ $(du -sm /fill | cut -f1) -lt {touch_mib} ]; do
    i=$((i + 1))
    for f in /bin/* /sbin/* /etc/* /lib/modules/*/modules.*; do
      [ -f "$f" ] && {{ echo "copy $i of $f"; cat "$f"; }} >> /fill/blob.$i
    done
  done
  echo filled > /srv/www/filled
) >/dev/null 2>&1 &
"""


def gzip_baseline(files: list[Path], work: Path) -> tuple[float, int]:
    """gzip -6 of each raw file, one after the other: seconds and compressed bytes."""
    size = 0
    t0 = time.monotonic()
    for f in files:
        out = work / (f.name + ".gz")
        with out.open("wb") as sink:
            subprocess.run(["gzip", "-6", "-c", str(f)], stdout=sink, check=True)
        size += out.stat().st_size
        out.unlink()
    return time.monotonic() - t0, size


def plain_command(hatch_cmd: list[str], memory: str, disk: Path, vm_dir: Path) -> list[str]:
    """hatchd's QEMU command for the VM, made plain: the given memory backend (same block id
    "mem"), another disk file, console and QMP in vm_dir, in the foreground."""
    cmd = hatch_cmd[: hatch_cmd.index("-pidfile")]
    out: list[str] = []
    for arg in cmd:
        if arg.startswith("memory-backend-"):
            arg = memory
        elif arg.startswith("id=disk,file="):
            arg = f"id=disk,file={disk},format=raw,if=none,discard=unmap"
        elif arg.startswith("socket,id=con,path="):
            arg = f"file,id=con,path={vm_dir / 'console.log'}"
        elif arg.startswith("socket,id=agent,path="):  # the guest agent's port: unused here
            arg = f"socket,id=agent,path={vm_dir / 'agent.sock'},server=on,wait=off"
        elif arg.startswith("unix:") and "qmp-events.sock" in arg:
            out.pop()  # its "-qmp": hatchd's event monitor is not needed here
            continue
        elif arg.startswith("unix:") and arg.endswith("server=on,wait=off"):
            arg = f"unix:{vm_dir / 'qmp.sock'},server=on,wait=off"
        elif arg.startswith("socket,id=qmp,fd="):  # hatchd hands QEMU its QMP socket
            arg = f"socket,id=qmp,path={vm_dir / 'qmp.sock'},server=on,wait=off"
        out.append(arg)
    return out


async def make_stream(hatch_cmd: list[str], vm_dir: Path, state: Path, stream: Path) -> None:
    """Turn hatchd's snapshot (RAM file + device state) into one uncompressed migration
    stream with all of RAM in it, as a plain QEMU save would write it."""
    memory = f"memory-backend-file,id=mem,size={MEM_MIB}M,mem-path={vm_dir / 'mem'},share=on"
    cmd = plain_command(hatch_cmd, memory, vm_dir / "disk", vm_dir)
    cmd += ["-S", "-incoming", "defer"]  # -S: stay paused, the state must not move
    proc = await asyncio.create_subprocess_exec(*cmd, stdin=subprocess.DEVNULL)
    try:
        for _ in range(100):
            if (vm_dir / "qmp.sock").exists():
                break
            await asyncio.sleep(0.1)
        async with qmp_session(vm_dir / "qmp.sock") as qmp:
            caps = [{"capability": "x-ignore-shared", "state": True}]
            await qmp.execute("migrate-set-capabilities", {"capabilities": caps})
            await qmp.execute("migrate-incoming", {"uri": f"exec:cat {shlex.quote(str(state))}"})
            await qmp.wait_migration(120)
            caps = [{"capability": "x-ignore-shared", "state": False}]
            await qmp.execute("migrate-set-capabilities", {"capabilities": caps})
            uri = f"exec:cat > {shlex.quote(str(stream))}"
            await qmp.execute("migrate", {"uri": uri})
            await qmp.wait_migration(300)
    finally:
        proc.kill()
        await proc.wait()


async def cont_when_loaded(sock: Path, proc: subprocess.Popen[bytes], timeout: float = 120) -> None:
    """The stream was saved from a paused guest, so QEMU stays paused once it has loaded it:
    say `cont` as soon as it has (as hatchd does). A QEMU in the foreground binds its QMP
    socket a moment before it listens on it: a refused connection is tried again."""
    deadline = time.monotonic() + timeout
    while True:
        if proc.poll() is not None:
            raise VMMError(f"qemu exited with {proc.returncode}")
        if time.monotonic() > deadline:
            raise TimeoutError(sock)
        if sock.exists():
            try:
                async with qmp_session(sock) as qmp:
                    while (await qmp.execute("query-status")).get("status") == "inmigrate":
                        if time.monotonic() > deadline:
                            raise TimeoutError(sock)
                        await asyncio.sleep(0.005)
                    await qmp.execute("cont")
                    return
            except VMMError as exc:
                if "QMP connect" not in str(exc):
                    raise
        await asyncio.sleep(0.005)


def raw_restore(
    cmd: list[str], stream: Path, disk_src: Path, disk: Path, url: str
) -> tuple[float, float]:
    """A plain QEMU resuming from the uncompressed stream: seconds to the first HTTP answer;
    then, of the same running guest, seconds of a plain QMP `migrate` of its whole RAM to a
    file (what a snapshot costs without a RAM file: the baseline of the snapshot call)."""
    subprocess.run(["cp", "--sparse=always", str(disk_src), str(disk)], check=True)
    sock = disk.parent / "qmp.sock"
    sock.unlink(missing_ok=True)
    log = disk.with_name("qemu.log")
    t0 = time.monotonic()
    with log.open("wb") as sink:
        proc = subprocess.Popen(
            [*cmd, "-incoming", f"exec:cat {shlex.quote(str(stream))}"],
            stdin=subprocess.DEVNULL,
            stdout=sink,
            stderr=sink,
        )
    try:
        asyncio.run(cont_when_loaded(sock, proc))
        restored = first_answer(url, timeout=120) - t0
        migrated = asyncio.run(raw_migrate(sock, disk.with_name("migrated")))
        return restored, migrated
    except (TimeoutError, VMMError) as exc:
        raise RuntimeError(f"raw qemu baseline failed ({exc}): {log.read_text()[-2000:]}") from None
    finally:
        proc.kill()
        proc.wait()
        disk.with_name("migrated").unlink(missing_ok=True)


async def raw_migrate(sock: Path, dest: Path) -> float:
    """QMP `migrate` of the running guest's whole RAM and device state to dest; seconds from
    the command to its completion (the guest is paused at the end, as by a snapshot)."""
    async with qmp_session(sock) as qmp:
        t0 = time.monotonic()
        await qmp.execute("migrate", {"uri": f"exec:cat > {shlex.quote(str(dest))}"})
        await qmp.wait_migration(300)
        return time.monotonic() - t0


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--touch-mib", type=int, default=MEM_MIB // 2)
    parser.add_argument("--keep", action="store_true", help="keep the files for a post-mortem")
    parser.add_argument("--vms", type=int, default=10, help="VMs of one user for the dedup ratio")
    parser.add_argument("--s3-rounds", type=int, default=5, help="restore pairs on S3")
    args = parser.parse_args()
    ensure_test_image()
    if in_initial_netns():
        enter_fresh_netns()
    daemon = HatchDaemon(
        HATCH_MAX_SNAPSHOTS_PER_VM="50",
        HATCH_LOG_LEVEL="warning",
        # Room for --vms VMs of one user besides the first.
        HATCH_MAX_VMS_PER_USER=str(args.vms + 1),
        HATCH_MAX_VCPUS_PER_USER=str(4 * (args.vms + 1)),
        HATCH_MAX_MEM_MIB_PER_USER=str(MEM_MIB * (args.vms + 1)),
        HATCH_MAX_DISK_MIB_PER_USER=str(2048 * (args.vms + 1)),
    )
    daemon.start()
    key = daemon.create_key("bench")
    work = Path(tempfile.mkdtemp(prefix="hvs-", dir=daemon.data_dir))
    snap_times: list[float] = []  # the API call: returns once the guest is captured
    store_times: list[float] = []  # until the snapshot is stored (in the background)
    raw_migrates: list[float] = []  # a plain QMP migrate of the same guest's RAM to a file
    hot_restores: list[float] = []
    raw_restores: list[float] = []
    later_sizes: list[int] = []  # snapshots of the VM after a hot restore, idle in between
    try:
        with httpx.Client(
            base_url=daemon.url, timeout=600, headers={"Authorization": f"Bearer {key}"}
        ) as api:
            body = {"mem_mib": MEM_MIB, "user_data": workload(args.touch_mib)}
            vm = api.post("/vms", json=body).raise_for_status().json()
            accel = str(api.get("/healthz").json().get("accel", "?"))
            vm_id, url = vm["id"], f"http://{vm['guest_ip']}:8080/filled"
            print(f"vm {vm_id}: filling {args.touch_mib} MiB of its {MEM_MIB} MiB ...", flush=True)
            first_answer(url, timeout=900)
            vm_dir = daemon.data_dir / "vms" / vm_id
            hatch_cmd = hatchd_command(vm_id)

            t0 = time.monotonic()
            first = api.post(f"/vms/{vm_id}/snapshot").raise_for_status().json()
            snap_times.append(time.monotonic() - t0)
            first = stored(api, first)
            store_times.append(time.monotonic() - t0)
            standby_ready(api)
            mem, disk, state = vm_dir / MEM_NAME, vm_dir / DISK_NAME, vm_dir / "resume" / "state"
            touched = int(subprocess.check_output(["du", "-B1", str(mem)]).split()[0])
            gzip_s, gzip_bytes = gzip_baseline([mem, disk, state], work)
            print(
                f"snapshot 1: {snap_times[-1]:.2f}s {first['size_bytes'] / 2**20:.1f} MiB;"
                f" gzip -6: {gzip_s:.2f}s {gzip_bytes / 2**20:.1f} MiB",
                flush=True,
            )

            # The baseline's stream, from the same guest state.
            raw_dir = work / "raw"
            raw_dir.mkdir()
            subprocess.run(["cp", "--sparse=always", str(mem), str(raw_dir / "mem")], check=True)
            stream = work / "stream"
            subprocess.run(["cp", "--sparse=always", str(disk), str(raw_dir / "disk")], check=True)
            asyncio.run(make_stream(hatch_cmd, raw_dir, state, stream))
            (raw_dir / "mem").unlink()
            memory = f"memory-backend-ram,id=mem,size={MEM_MIB}M"
            plain = plain_command(hatch_cmd, memory, raw_dir / "disk", raw_dir)
            disk_copy = work / "disk.at-snapshot"
            subprocess.run(["cp", "--sparse=always", str(disk), str(disk_copy)], check=True)
            # The raw QEMU gets a TAP of its own: hatchd's sleeping VM keeps its TAP for its
            # wake standby.
            tap = tap_name(daemon.tap_prefix, "raw")
            hatchd_tap = tap_name(daemon.tap_prefix, vm_id)
            plain = [a.replace(f"ifname={hatchd_tap},", f"ifname={tap},") for a in plain]

            for i in range(args.rounds):  # interleaved, so drift hits both alike
                attach(daemon, tap, vm)
                restored, migrated = raw_restore(plain, stream, disk_copy, raw_dir / "disk", url)
                raw_restores.append(restored)
                raw_migrates.append(migrated)
                detach(daemon, tap, vm)
                t0 = time.monotonic()
                api.post(f"/vms/{vm_id}/restore").raise_for_status()
                hot_restores.append(first_answer(url, timeout=300) - t0)
                t0 = time.monotonic()
                later = api.post(f"/vms/{vm_id}/snapshot").raise_for_status().json()
                snap_times.append(time.monotonic() - t0)
                later = stored(api, later)
                store_times.append(time.monotonic() - t0)
                standby_ready(api)
                later_sizes.append(later["size_bytes"])
                print(
                    f"round {i + 1}: raw qemu restore {raw_restores[-1]:.2f}s"
                    f"  raw migrate {raw_migrates[-1]:.2f}s"
                    f"  hatchd restore {hot_restores[-1]:.2f}s"
                    f"  hatchd snapshot {snap_times[-1]:.3f}s (stored {store_times[-1]:.2f}s)",
                    flush=True,
                )
            # An older snapshot: verified and unpacked from the store first.
            t0 = time.monotonic()
            api.post(f"/vms/{vm_id}/restore", json={"snapshot_id": first["id"]})
            cold_restore = first_answer(url, timeout=300) - t0
            stored(api, api.post(f"/vms/{vm_id}/snapshot").raise_for_status().json())
            old_decode, new_decode = decode_against_restore(daemon, first["id"])
            old_cold, new_cold = cold_restores(api, daemon, vm, first["id"], url)
            print(
                f"decode {old_decode:.2f}s / chunks {new_decode:.2f}s;"
                f" cold restore old {old_cold:.2f}s / chunks {new_cold:.2f}s",
                flush=True,
            )
            api.delete(f"/vms/{vm_id}").raise_for_status()  # its memory, for the next VMs
        print(f"{args.vms} VMs of one user, filling {args.touch_mib} MiB each ...", flush=True)
        together, alone, old_alone = ten_vms(daemon, workload(args.touch_mib), MEM_MIB, args.vms)
    finally:
        if args.keep:
            daemon.stop()
            print(f"kept {daemon.data_dir}")
        else:
            daemon.cleanup()
    print("S3: a VM on a SeaweedFS bucket ...", flush=True)
    s3_hot, s3_cold, s3_size = s3_streaming(workload(args.touch_mib), MEM_MIB, args.s3_rounds)
    snap_med = statistics.median(snap_times)
    raw_med, hot_med = statistics.median(raw_restores), statistics.median(hot_restores)
    size = first["size_bytes"]
    print()
    print(
        f"{MEM_MIB} MiB VM, {touched / 2**20:.0f} MiB of its memory file touched,"
        f" accel={accel}; medians of {len(snap_times)} snapshots, {args.rounds} restores"
    )
    store_med, migrate_med = statistics.median(store_times), statistics.median(raw_migrates)
    print(f"  snapshot call   hatchd {snap_med:6.3f} s   raw QMP migrate {migrate_med:6.2f} s")
    print(f"    ratio         {snap_med / migrate_med:6.3f}  (goal <= 0.1)")
    print(f"  snapshot stored hatchd {store_med:6.2f} s   gzip -6 {gzip_s:6.2f} s")
    print(f"    speed-up      {gzip_s / store_med:6.2f}x  (goal >= 3x)")
    print(f"  stored size     hatchd {size / 2**20:6.1f} MiB gzip -6 {gzip_bytes / 2**20:6.1f} MiB")
    print(f"    ratio         {size / gzip_bytes:6.3f}  (goal <= 0.5)")
    print(f"  restore to HTTP hatchd {hot_med:6.2f} s   raw qemu -incoming {raw_med:6.2f} s")
    print(f"    overhead      {hot_med / raw_med - 1:+6.1%}  (goal <= +20%)")
    print(f"  restore of an older snapshot (fetch, verify, unpack) {cold_restore:6.2f} s")
    second = statistics.median(later_sizes)
    print("chunk store")
    print(
        f"  second snapshot (idle between) adds {second / 2**20:6.2f} MiB of the first's"
        f" {size / 2**20:.1f} MiB: {second / size:6.3f}  (goal <= 0.10)"
    )
    print(
        f"  {args.vms} VMs of one user store {together / 2**20:6.1f} MiB; alone in chunk stores"
        f" {alone / 2**20:.1f} MiB: {together / alone:6.3f}  (goal <= 0.3);"
        f" old format alone {old_alone / 2**20:.1f} MiB: {together / old_alone:6.3f}"
    )
    print(
        f"  rebuild files from the store {new_decode:6.2f} s   old whole-file decode"
        f" {old_decode:6.2f} s: {new_decode / old_decode:6.2f}x  (goal <= 1)"
    )
    print(
        f"  cold restore to HTTP: chunks {new_cold:6.2f} s   old format {old_cold:6.2f} s:"
        f" {new_cold / old_cold:6.2f}x  (goal <= 1)"
    )
    print(
        f"  S3 ({s3_size / 2**20:.0f} MiB stored): restore streamed from S3 {s3_cold:6.2f} s"
        f"   hot restore {s3_hot:6.2f} s: {s3_cold / s3_hot:6.2f}x  (goal <= 3;"
        f" medians of {args.s3_rounds})"
    )


def attach(daemon: HatchDaemon, tap: str, vm: dict) -> None:
    """The raw QEMU's TAP, admitted by hatchd's guest isolation as hatchd admits its own."""
    links.ensure_tap(tap, daemon.bridge)
    firewall.allow_guest(daemon.table, tap, vm["guest_mac"], vm["guest_ip"], False)
    links.pin_neighbour(daemon.bridge, vm["guest_ip"], vm["guest_mac"])


def detach(daemon: HatchDaemon, tap: str, vm: dict) -> None:
    links.unpin_neighbour(daemon.bridge, vm["guest_ip"])
    firewall.forget_guest(daemon.table, tap, vm["guest_mac"], vm["guest_ip"])
    links.delete_link(tap)


def hatchd_command(vm_id: str) -> list[str]:
    """The QEMU command line hatchd used for the VM, as the kernel recorded it."""
    out = subprocess.run(["pgrep", "-f", f"hatch-{vm_id}"], capture_output=True, text=True)
    pids = out.stdout.split()
    if pids:
        return Path(f"/proc/{pids[0]}/cmdline").read_text().rstrip("\0").split("\0")
    raise RuntimeError(f"no qemu for {vm_id}")


if __name__ == "__main__":
    main()
