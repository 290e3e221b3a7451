"""The VM lifecycle end to end: real hatchd, real QEMU guests, inside the suite's namespace."""

from __future__ import annotations

import os
import re
import subprocess
from pathlib import Path

import httpx
import pytest

from hatchvm.client import HatchAPIError
from hatchvm.net.alloc import tap_name
from tests.support.host import link_exists, pinned_addresses, qemu_pids
from tests.support.outside import HOST_UPLINK, outside_world
from tests.support.wait import http_text, wait_for, wait_http

pytestmark = pytest.mark.vm

OUTSIDE = "203.0.113.10"  # a public-looking host beyond the host's uplink

# Serves the guest's own files on port 8080; runs at every boot.
WEB_SERVER = """#!/bin/sh
mkdir -p /srv/www
echo "hello from $(hostname)" > /srv/www/index.html
busybox httpd -p 8080 -h /srv/www
"""

# Writes a random token once; the token must survive stop/start (it lives on the VM's disk).
PERSISTENT_TOKEN = """#!/bin/sh
mkdir -p /srv/www /root/state
[ -f /root/state/token ] || cat /proc/sys/kernel/random/uuid > /root/state/token
cp /root/state/token /srv/www/token
cat /proc/sys/kernel/random/boot_id > /srv/www/boot_id
busybox httpd -p 8080 -h /srv/www
"""


def environment(pid: int) -> dict[str, str]:
    raw = Path(f"/proc/{pid}/environ").read_bytes().split(b"\0")
    return dict(v.decode().partition("=")[::2] for v in raw if v)


def test_create_serves_http_from_user_data(api, hatch) -> None:
    vm = api.create_vm(user_data=WEB_SERVER, mem_mib=256)
    assert vm["state"] == "running"
    assert vm["id"].startswith("vm_") and vm["image_id"] == "img_default"
    assert vm["guest_ip"].startswith(f"{hatch.subnet}.")
    settings = hatch.settings()
    assert vm["guest_mac"].startswith("02:")
    assert settings.ssh_port_min <= vm["ssh_port"] <= settings.ssh_port_max
    body = wait_http(f"http://{vm['guest_ip']}:8080/")
    assert body.strip() == f"hello from {vm['id'].replace('_', '-')}"
    assert [v["id"] for v in api.list_vms()] == [vm["id"]]
    assert api.get_vm(vm["id"])["state"] == "running"
    console = hatch.data_dir / "vms" / vm["id"] / "console.log"
    assert console.stat().st_size > 0


def test_file_survives_stop_and_start(api, hatch) -> None:
    vm = api.create_vm(user_data=PERSISTENT_TOKEN, mem_mib=256)
    base = f"http://{vm['guest_ip']}:8080"
    token = wait_http(base + "/token").strip()
    boot1 = wait_http(base + "/boot_id").strip()
    assert link_exists(vm_tap(hatch, vm))
    stopped = api.stop_vm(vm["id"])
    assert stopped["state"] == "stopped"
    assert qemu_pids(vm["id"]) == []
    assert not link_exists(vm_tap(hatch, vm))
    with pytest.raises(HatchAPIError) as err:
        api.stop_vm(vm["id"])
    assert err.value.status == 409 and err.value.message == "vm is stopped, must be running"
    started = api.start_vm(vm["id"])
    assert started["state"] == "running"
    assert started["guest_ip"] == vm["guest_ip"] and started["guest_mac"] == vm["guest_mac"]
    assert wait_http(base + "/boot_id").strip() != boot1  # really a new boot
    assert wait_http(base + "/token").strip() == token


def vm_tap(hatch, vm) -> str:
    return tap_name(hatch.tap_prefix, vm["id"])


def test_vms_cannot_reach_each_other(api, hatch) -> None:
    with outside_world([OUTSIDE]):
        a = api.create_vm(user_data=WEB_SERVER, mem_mib=256)
        wait_http(f"http://{a['guest_ip']}:8080/")
        # B tries A (must fail) and a host outside, through the egress path (must work), and
        # publishes the outcome and what the outside host saw.
        # (`timeout`, not wget's -T: Debian 12's static busybox wget crashes on -T.)
        probe = f"""#!/bin/sh
mkdir -p /srv/www
busybox httpd -p 8080 -h /srv/www
if timeout 5 wget -q -O /dev/null http://{a["guest_ip"]}:8080/; then r=reached; else r=blocked; fi
echo $r > /srv/www/peer
timeout 5 wget -q -O /srv/www/outside http://{OUTSIDE}/
"""
        b = api.create_vm(user_data=probe, mem_mib=256)
        assert b["guest_ip"] != a["guest_ip"] and b["guest_mac"] != a["guest_mac"]
        assert b["ssh_port"] != a["ssh_port"]
        outside = wait_http(f"http://{b['guest_ip']}:8080/outside", timeout=120)
        # Reached, and masqueraded behind the host's own address on the way out.
        assert outside.strip() == f"reached {OUTSIDE} from {HOST_UPLINK}"
        assert wait_http(f"http://{b['guest_ip']}:8080/peer").strip() == "blocked"


# Two guests that try to take over a victim's address: one claims its IP (and answers ARP for
# it), the other also takes its MAC. Both keep announcing the stolen address.
IP_THIEF = """#!/bin/sh
mkdir -p /srv/www
echo "hello from a thief" > /srv/www/index.html
ip addr add {ip}/32 dev eth0
busybox httpd -p 8080 -h /srv/www
echo "thief armed"
n=0
while :; do
  arping -U -c 1 -I eth0 -s {ip} {ip} >/dev/null 2>&1
  n=$((n + 1)); echo "thief announced $n" > /dev/console
  sleep 0.2
done &
"""
MAC_THIEF = """#!/bin/sh
ip link set eth0 down
ip link set eth0 address {mac}
ip link set eth0 up
""" + IP_THIEF.removeprefix("#!/bin/sh\n")


def announcements(console: Path) -> int:
    """How often a thief has announced the stolen address so far."""
    counts = re.findall(r"thief announced (\d+)", console.read_text(errors="replace"))
    return int(counts[-1]) if counts else 0


def answer_at(ip: str) -> str | None:
    """What answers on ip:8080 from the host, or None when nothing does."""
    try:
        return http_text(f"http://{ip}:8080/", timeout=3)
    except httpx.TransportError:
        return None


def test_a_vm_cannot_take_over_another_vms_address(api, hatch) -> None:
    victim = api.create_vm(user_data=WEB_SERVER, mem_mib=256)
    hello = wait_http(f"http://{victim['guest_ip']}:8080/")
    assert victim["id"].replace("_", "-") in hello
    stolen = {"ip": victim["guest_ip"], "mac": victim["guest_mac"]}
    thieves = [
        api.create_vm(user_data=script.format(**stolen), mem_mib=256)
        for script in (IP_THIEF, MAC_THIEF)
    ]
    for thief in thieves:
        console = hatch.data_dir / "vms" / thief["id"] / "console.log"
        wait_for(lambda c=console: "thief armed" in c.read_text(), 120, "the thief's script")
    # The IP thief's own address still works: only the stolen one is refused.
    assert "thief" in wait_http(f"http://{thieves[0]['guest_ip']}:8080/")

    consoles = [hatch.data_dir / "vms" / thief["id"] / "console.log" for thief in thieves]
    answers = []
    for _ in range(10):
        answers.append(answer_at(victim["guest_ip"]))
        # Both thieves announce the stolen address again before the next request.
        heard = [announcements(c) for c in consoles]
        wait_for(
            lambda h=heard: all(announcements(c) > n for c, n in zip(consoles, h, strict=True)),
            60,
            "a new announcement from each thief",
        )
    assert answers == [hello] * 10

    # Asleep, the victim's address answers nobody, rather than a thief.
    api.stop_vm(victim["id"])
    assert victim["guest_ip"] not in pinned_addresses(hatch.bridge)
    assert [answer_at(victim["guest_ip"]) for _ in range(3)] == [None] * 3

    api.start_vm(victim["id"])
    assert wait_http(f"http://{victim['guest_ip']}:8080/") == hello
    assert [answer_at(victim["guest_ip"]) for _ in range(5)] == [hello] * 5


def test_delete_leaves_nothing_behind(api, hatch) -> None:
    vm = api.create_vm(user_data=WEB_SERVER, mem_mib=256)
    wait_http(f"http://{vm['guest_ip']}:8080/")
    tap = vm_tap(hatch, vm)
    vm_dir = hatch.data_dir / "vms" / vm["id"]
    assert qemu_pids(vm["id"]) and link_exists(tap) and vm_dir.exists()
    assert api.delete_vm(vm["id"]) == {"status": "deleted"}
    assert qemu_pids(vm["id"]) == []
    assert not link_exists(tap)
    assert not vm_dir.exists()
    ruleset = subprocess.run(["nft", "list", "ruleset"], capture_output=True, text=True).stdout
    assert tap not in ruleset and vm["guest_ip"] not in ruleset
    with pytest.raises(HatchAPIError) as err:
        api.get_vm(vm["id"])
    assert err.value.status == 404
    # Its address is free again: the next VM gets it.
    again = api.create_vm(enable_network=True, mem_mib=256)
    assert again["guest_ip"] == vm["guest_ip"]


def test_vm_without_network(api, hatch) -> None:
    vm = api.create_vm(enable_network=False, mem_mib=256)
    assert vm["state"] == "running" and vm["enable_network"] is False
    assert vm["guest_ip"] is None and vm["guest_mac"] is None and vm["ssh_port"] is None
    (pid,) = qemu_pids(vm["id"])
    # A guest escape lands in QEMU: it gets none of hatchd's settings (S3 and auth secrets).
    assert hatch.proc is not None and "HATCH_DATA_DIR" in environment(hatch.proc.pid)
    assert [k for k in environment(pid) if k.startswith("HATCH_")] == []
    assert api.stop_vm(vm["id"])["state"] == "stopped"
    assert api.start_vm(vm["id"])["state"] == "running"


@pytest.mark.postgres
def test_daemon_killed_and_restarted_keeps_running_vms(hatch) -> None:
    key = hatch.create_key("alice")
    with hatch.client(key) as api:
        keep = api.create_vm(user_data=WEB_SERVER, mem_mib=256)
        lost = api.create_vm(user_data=WEB_SERVER, mem_mib=256)
        wait_http(f"http://{keep['guest_ip']}:8080/")
    hatch.kill()
    for pid in qemu_pids(lost["id"]):  # this one dies while nobody watches
        os.kill(pid, 9)
    wait_for(lambda: not qemu_pids(lost["id"]), 10, "the killed QEMU to go")
    assert qemu_pids(keep["id"])  # the daemon's death did not take the VM with it
    hatch.start()
    with hatch.client(key) as api:
        assert api.get_vm(keep["id"])["state"] == "running"
        assert wait_http(f"http://{keep['guest_ip']}:8080/").startswith("hello")
        gone = api.get_vm(lost["id"])
        assert gone["state"] == "stopped" and "gone" in gone["state_reason"]
        # The host's neighbour entries follow: pinned for the running VM only.
        assert pinned_addresses(hatch.bridge) == {keep["guest_ip"]}
        assert api.start_vm(lost["id"])["state"] == "running"
        assert wait_http(f"http://{lost['guest_ip']}:8080/").startswith("hello")
        # The reattached VM is fully managed again: stop works through its QMP socket.
        assert api.stop_vm(keep["id"])["state"] == "stopped"
        assert qemu_pids(keep["id"]) == []
