"""After a restore the guest has the host's wall clock and a reseeded RNG, through the guest
agent: real hatchd, real guests. Also: an image without the agent, a stuck or killed agent,
and a guest that speaks garbage on the agent's port.

Each guest serves CGI scripts: its clock (busybox adjtimex: seconds and microseconds), 32
bytes of /dev/urandom, and ways to stop, continue or kill its agent."""

from __future__ import annotations

import asyncio
import os
import re
import shutil
import tempfile
import time
from pathlib import Path

import httpx
import pytest

from hatchvm.agent.agents import Agents
from hatchvm.images.builder import current_artifacts
from hatchvm.images.disk import create_vm_disk
from hatchvm.vmm.base import BootSpec
from hatchvm.vmm.qemu import QemuVMM
from tests.support.image import TEST_IMAGE_DIR, install_image_without_agent
from tests.support.wait import http_text, wait_for, wait_http

pytestmark = pytest.mark.vm

ASLEEP_S = 15  # how long a snapshot sleeps: far more than the 1 s the clock may be off
UPTIME_S = 30  # a guest's age before the randomness test's snapshot (see that test)
NO_ANSWER = "clock not synced, RNG not reseeded: the guest agent did not answer in 2 s"

CGI = r"""#!/bin/sh
mkdir -p /srv/www/cgi-bin
cgi() {
  { printf '#!/bin/sh\nprintf "Content-Type: text/plain\\r\\n\\r\\n"\n'; cat; } \
    > /srv/www/cgi-bin/$1
  chmod 755 /srv/www/cgi-bin/$1
}
echo 'adjtimex' | cgi time
echo 'head -c 32 /dev/urandom | od -An -tx1 | tr -d " \n"' | cgi random
echo 'pidof hatch-agent || echo none' | cgi agent
echo 'kill -STOP $(pidof hatch-agent) && echo stopped' | cgi stop-agent
echo 'kill -CONT $(pidof hatch-agent) && echo continued' | cgi cont-agent
echo 'kill -KILL $(pidof hatch-agent) && echo killed' | cgi kill-agent
busybox httpd -p 8080 -h /srv/www
"""

# A guest that stops its agent for good (init no longer starts it) and writes to the agent's
# port itself: random bytes, and frames that look right but answer nothing (late sync
# answers) or claim 4 GiB.
HOSTILE = (
    CGI
    + r"""
sed -i '/hatch-agent/d' /etc/inittab && kill -HUP 1
n=0
while [ $n -lt 30 ]; do
  pids=$(pidof hatch-agent) && kill -KILL $pids
  n=$((n + 1)); usleep 100000
done
port=
for d in /sys/class/virtio-ports/*; do
  [ "$(cat $d/name)" = org.hatchvm.agent.0 ] && port=/dev/${d##*/}
done
[ -n "$port" ] || { echo "no agent port" > /dev/console; exit 1; }
late='HV\001\203\000\000\000\173\000\001\000\000\000\000\000\000'
huge='HV\001\203\000\000\000\001\000\001\000\000\377\377\377\377'
(
  while :; do
    head -c 65536 /dev/urandom
    i=0; while [ $i -lt 50 ]; do printf "$late"; i=$((i + 1)); done
    printf "$huge"
  done > "$port"
) > /dev/null 2>&1 &
echo hostile > /srv/www/hostile
"""
)


@pytest.fixture
def no_agent_image(hatch) -> str:
    """img_noagent: img_default as it was before the agent, i.e. without the binary and its
    inittab line (a user's own image, or one built by an older hatchvm)."""
    return install_image_without_agent(hatch.settings(), "img_noagent")


def cgi(vm: dict, name: str) -> str:
    return wait_http(f"http://{vm['guest_ip']}:8080/cgi-bin/{name}").strip()


def clock_offset(vm: dict) -> float:
    """The guest's wall clock minus the host's, read over HTTP: negative when the guest is
    behind. The host's clock is read just before and after; a guest time between the two is
    an offset of 0 (as close as this can see), else the distance to the nearer one."""

    def attempt() -> tuple[float] | None:
        before = time.time()
        text = http_text(f"http://{vm['guest_ip']}:8080/cgi-bin/time", timeout=5)
        after = time.time()
        if text is None:
            return None
        fields = dict(re.findall(r"(time\.tv_sec|time\.tv_usec|status):\s+(\d+)", text))
        nano = int(fields["status"]) & 0x2000  # STA_NANO: tv_usec holds nanoseconds
        guest = int(fields["time.tv_sec"]) + int(fields["time.tv_usec"]) / (1e9 if nano else 1e6)
        print(
            f"guest clock {guest - before:+.4f} s from the request's start "
            f"(the request took {after - before:.4f} s)"
        )
        return (guest - min(max(guest, before), after),)

    return wait_for(attempt, 60, "the guest's clock over HTTP")[0]


def sleep_in_snapshot(api, vm: dict) -> dict:
    snap = api.snapshot_vm(vm["id"], wait_stored=True)  # no store running while measured
    # The point is elapsed time while the VM is frozen: nothing to wait for but the clock.
    time.sleep(ASLEEP_S)
    return snap


def rss_kib(pid: int) -> int:
    status = open(f"/proc/{pid}/status").read()
    return int(re.search(r"VmRSS:\s+(\d+)", status).group(1))  # type: ignore[union-attr]


def test_a_restored_guest_has_the_hosts_clock_before_the_first_request(api, hatch) -> None:
    vm = api.create_vm(user_data=CGI, mem_mib=256)
    # A cold boot is synced in the background too (the RTC only gives whole seconds).
    wait_for(lambda: abs(clock_offset(vm)) < 1, 120, "the booted guest's clock in sync")

    sleep_in_snapshot(api, vm)
    restored = api.restore_vm(vm["id"])
    offset = clock_offset(vm)  # the first request after the restore
    assert restored["state"] == "running" and restored["state_reason"] is None
    assert abs(offset) < 1, f"guest clock off by {offset:.3f} s after the restore"

    # hatchd goes away and comes back: the agent waits for it and serves the new daemon.
    hatch.kill()
    hatch.start()
    sleep_in_snapshot(api, vm)
    restored = api.restore_vm(vm["id"])
    offset = clock_offset(vm)
    assert restored["state_reason"] is None
    assert abs(offset) < 1, f"guest clock off by {offset:.3f} s after a daemon restart"


def test_restores_of_one_snapshot_do_not_share_randomness(api) -> None:
    """Without the reseed, guests restored from one memory image read the same bytes: the
    kernel's CRNG state is in that memory. The kernel also reseeds by itself (mixing in
    RDSEED) once its key is older than max(1 s, uptime / 2) in the first two minutes, which
    can fall between a restore and the read and hide the shared state: so the guest is 30 s
    up and idle when its key is renewed by the read just before the snapshot. Against the
    code before the agent this failed in every run tried (8; in 5 all three reads were the
    same)."""
    created = time.monotonic()
    vm = api.create_vm(user_data=CGI, mem_mib=256)
    cgi(vm, "agent")
    # Elapsed uptime is the point (see above): nothing to wait for but the clock.
    time.sleep(max(0.0, UPTIME_S - (time.monotonic() - created)))
    cgi(vm, "random")
    snap = api.snapshot_vm(vm["id"])

    seen = []
    for _ in range(3):
        api.restore_vm(vm["id"], snap["id"])  # the same memory each time
        seen.append(cgi(vm, "random"))  # the first thing the restored guest is asked
        assert cgi(vm, "random") != seen[-1]  # control: the guest's RNG does move on
        api.snapshot_vm(vm["id"])
    print("first random bytes after each restore:", *seen, sep="\n  ")
    assert all(len(value) == 64 for value in seen)
    assert len(set(seen)) == 3, "guests restored from one snapshot read the same random bytes"


def test_an_image_without_the_agent_still_restores_with_a_warning(api, no_agent_image) -> None:
    vm = api.create_vm(user_data=CGI, mem_mib=256, image_id=no_agent_image)
    assert cgi(vm, "agent") == "none"  # no agent in this guest
    sleep_in_snapshot(api, vm)
    started = time.monotonic()
    restored = api.restore_vm(vm["id"])
    took = time.monotonic() - started
    assert restored["state"] == "running"
    assert restored["state_reason"] == NO_ANSWER
    assert api.get_vm(vm["id"])["state_reason"] == NO_ANSWER
    assert clock_offset(vm) < -ASLEEP_S / 2  # really not synced: the old behaviour
    print(f"restore without an agent took {took:.2f} s")
    # A restore that is synced again clears the warning: covered by the tests above.


def test_a_stuck_agent_gives_a_clear_warning_and_a_killed_one_comes_back(api) -> None:
    vm = api.create_vm(user_data=CGI, mem_mib=256)
    wait_for(lambda: abs(clock_offset(vm)) < 1, 120, "the booted guest's clock in sync")
    assert cgi(vm, "stop-agent") == "stopped"

    sleep_in_snapshot(api, vm)
    restored = api.restore_vm(vm["id"])
    assert restored["state"] == "running"
    assert restored["state_reason"] == NO_ANSWER
    assert clock_offset(vm) < -ASLEEP_S / 2

    # Let it run on: it answers the old request late, which set the guest's clock to the time
    # of the restore, long past; hatchd sees the late answer and syncs again at once.
    assert cgi(vm, "cont-agent") == "continued"
    wait_for(lambda: abs(clock_offset(vm)) < 1, 30, "the guest's clock resynced")

    # Killed, init starts it again, and the next restore is synced.
    old_pid = cgi(vm, "agent")
    assert cgi(vm, "kill-agent") == "killed"
    new_pid = wait_for(
        lambda: (pid := cgi(vm, "agent")) and pid != old_pid and pid, 30, "a new agent"
    )
    assert new_pid != old_pid
    sleep_in_snapshot(api, vm)
    restored = api.restore_vm(vm["id"])
    assert restored["state_reason"] is None
    assert abs(clock_offset(vm)) < 1


def test_a_guest_speaking_garbage_on_the_agent_port_cannot_hurt_hatchd(api, hatch) -> None:
    good = api.create_vm(user_data=CGI, mem_mib=256)
    hostile = api.create_vm(user_data=HOSTILE, mem_mib=256)
    assert wait_http(f"http://{hostile['guest_ip']}:8080/hostile").strip() == "hostile"
    assert hatch.proc is not None
    # The first store of a VM's pages grows hatchd's heap by about 30 MiB (pack buffers in a
    # malloc arena of its own; measured on main and on this branch alike), which is not what
    # is measured here: both VMs are stored once before hatchd's RSS is taken.
    api.snapshot_vm(good["id"], wait_stored=True)
    api.restore_vm(good["id"])
    rss_before = 0

    for cycle in range(4):
        if cycle == 1:  # after a first snapshot and restore have warmed hatchd up
            rss_before = rss_kib(hatch.proc.pid)
        # Stored before the restore: hatchd's RSS is compared between equivalent moments
        # (a store in flight holds its packs' buffers).
        api.snapshot_vm(hostile["id"], wait_stored=True)
        started = time.monotonic()
        restored = api.restore_vm(hostile["id"])
        took = time.monotonic() - started
        reason = restored["state_reason"] or ""
        print(f"hostile restore: {took:.2f} s, state_reason: {reason}")
        assert restored["state"] == "running"
        assert reason.startswith("clock not synced, RNG not reseeded: the guest agent")
        assert httpx.get(f"{hatch.url}/healthz", timeout=5).status_code == 200

    # The well-behaved neighbour restores synced all along.
    sleep_in_snapshot(api, good)
    restored = api.restore_vm(good["id"])
    assert restored["state_reason"] is None
    assert abs(clock_offset(good)) < 1
    growth = rss_kib(hatch.proc.pid) - rss_before
    print(f"hatchd RSS growth while the guest wrote garbage: {growth} KiB")
    assert growth < 32 << 10, f"hatchd grew by {growth} KiB"
    log = hatch.log_path.read_text(errors="replace")
    assert "guest agent connection dropped" in log
    assert os.path.exists(f"/proc/{hatch.proc.pid}")


# ---- a snapshot taken before the agent port existed ------------------------------------

TICKS = """#!/bin/sh
(while :; do echo "tick $(cut -d' ' -f1 /proc/uptime)"; sleep 0.5; done) > /dev/console &
"""


class PortlessQemu(QemuVMM):
    """The devices of hatchvm before the agent: no virtio-serial device (its socket chardev
    stays, unused: chardevs are not part of a snapshot)."""

    def build_command(self, spec: BootSpec, qmp_fd: int | None = None) -> list[str]:
        cmd = super().build_command(spec, qmp_fd)
        for device in [
            a for a in cmd if a.startswith(("virtio-serial-device,", "virtserialport,"))
        ]:
            at = cmd.index(device)
            del cmd[at - 1 : at + 1]
        return cmd


async def last_tick(console: asyncio.StreamReader, above: float, timeout: float = 120) -> float:
    """The guest's uptime in the first console tick past `above`."""
    async with asyncio.timeout(timeout):
        while True:
            line = (await console.readline()).decode(errors="replace")
            if match := re.search(r"tick (\d+\.\d+)", line):
                if float(match.group(1)) > above:
                    return float(match.group(1))


async def test_a_snapshot_from_before_the_agent_port_restores_with_a_warning(tmp_path) -> None:
    """hatchd upgraded while VMs sleep: their snapshots hold no virtio-serial device, and
    restore on the new command line (the port sits in a slot after every other device, so
    none of them moves); the guest runs on without seeing it, and the sync warns."""
    image = current_artifacts(TEST_IMAGE_DIR)
    assert image is not None
    vm_dir = tmp_path / "vm_portless"
    vm_dir.mkdir()
    create_vm_disk(vm_dir / "disk.ext4", 64, "vm-portless", TICKS)
    spec = BootSpec(
        vm_id="vm_portless",
        vm_dir=vm_dir,
        kernel=image.kernel,
        initrd=image.initrd,
        rootfs=image.rootfs,
        disk=vm_dir / "disk.ext4",
        vcpu_count=1,
        mem_mib=256,
        cmdline=f"{image.boot_args} hatch.hostname=vm-portless",
        mem_file=vm_dir / "mem",
    )
    run_dir = Path(tempfile.mkdtemp(prefix="hva-", dir="/tmp"))  # short socket paths
    old, new = (
        PortlessQemu("qemu-system-x86_64", "tcg", run_dir),
        QemuVMM("qemu-system-x86_64", "tcg", run_dir),
    )
    agents = Agents(timeout=2.0)
    try:
        await old.boot(spec)
        reader, writer = await asyncio.open_unix_connection(str(old.console_socket(vm_dir)))
        await old.resume(spec.vm_id, vm_dir)
        before = await last_tick(reader, 0)
        await old.snapshot(spec.vm_id, vm_dir, vm_dir / "state")
        writer.close()

        await new.restore(spec, vm_dir / "state")
        reader, writer = await asyncio.open_unix_connection(str(new.console_socket(vm_dir)))
        await agents.attach(spec.vm_id, new.agent_socket(vm_dir), restored=True)
        await new.resume(spec.vm_id, vm_dir)
        assert await agents.after_resume(spec.vm_id) == NO_ANSWER
        assert await last_tick(reader, before) > before  # the same guest, running on
        writer.close()
    finally:
        await agents.close()
        await new.kill(spec.vm_id, vm_dir)
        shutil.rmtree(run_dir, ignore_errors=True)
