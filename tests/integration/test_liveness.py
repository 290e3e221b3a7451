"""Deaths are seen, and consoles are recorded and bounded: real guests, real hatchd.

A VM whose QEMU is killed behind hatchd's back, or whose guest powers off or panics, becomes
`stopped` with a reason and its last exit; a route wakes it again; restart "on-failure"
brings a crashed VM back by itself. The console is recorded by hatchd, readable and
followable through the API, and bounded on disk however fast a guest writes."""

from __future__ import annotations

import os
import signal
import sqlite3
import threading

import httpx
import pytest

from hatchvm.client import HatchAPIError
from tests.support.host import pinned_addresses, qemu_pids
from tests.support.wait import wait_for, wait_http

pytestmark = pytest.mark.vm

WEB = """#!/bin/sh
mkdir -p /srv/www
cat /proc/sys/kernel/random/boot_id > /srv/www/boot_id
busybox httpd -p 8080 -h /srv/www
echo "web server up"
"""


def boot_id(vm: dict) -> str:
    return wait_http(f"http://{vm['guest_ip']}:8080/boot_id").strip()


def stopped(api, vm: dict) -> dict:
    return wait_for(
        lambda: (v := api.get_vm(vm["id"]))["state"] == "stopped" and v, 60, "the vm stopped"
    )


def test_a_killed_vmm_is_seen_and_a_route_wakes_the_vm(api, hatch) -> None:
    vm = api.create_vm(user_data=WEB, mem_mib=256)
    first = boot_id(vm)
    api.create_route(vm["id"], target_port=8080, subdomain="phoenix")
    [pid] = qemu_pids(vm["id"])
    os.kill(pid, signal.SIGKILL)

    dead = stopped(api, vm)
    assert "ended unexpectedly (signal SIGKILL) at 20" in dead["state_reason"]
    last = dead["last_exit"]
    assert last["signal"] == signal.SIGKILL and last["exit_code"] is None
    assert any("web server up" in line for line in last["console"])  # the console's last lines
    assert vm["guest_ip"] not in pinned_addresses(hatch.bridge)

    woken = httpx.get(
        f"http://127.0.0.1:{hatch.proxy_port}/boot_id",
        headers={"Host": "phoenix.hatch.local"},
        timeout=120,
    )
    assert woken.status_code == 200 and woken.text.strip() != first  # a cold boot
    again = api.get_vm(vm["id"])
    assert again["state"] == "running" and again["last_exit"] == last  # kept for the user


def test_a_guest_that_powers_off_is_stopped_and_not_restarted(api) -> None:
    script = WEB + "(sleep 2; poweroff) &\n"
    vm = api.create_vm(user_data=script, mem_mib=256, restart="on-failure")
    dead = stopped(api, vm)
    assert "the guest powered off at " in dead["state_reason"]
    assert dead["last_exit"]["reason"] == "guest-shutdown"
    assert dead["last_exit"]["exit_code"] == 0
    assert qemu_pids(vm["id"]) == []
    # A clean power-off is not a failure: it stays stopped (checked after the back-off).
    with pytest.raises(AssertionError):
        wait_for(lambda: api.get_vm(vm["id"])["state"] != "stopped", 5, "a restart")


def test_on_failure_restarts_a_panicked_and_a_killed_vm(api) -> None:
    vm = api.create_vm(user_data=WEB, mem_mib=256, restart="on-failure")
    assert vm["restart"] == "on-failure"
    first = boot_id(vm)
    [pid] = qemu_pids(vm["id"])
    os.kill(pid, signal.SIGKILL)
    second = wait_for(
        lambda: (b := boot_id(vm)) != first and b, 120, "the vm restarted after SIGKILL"
    )
    assert api.get_vm(vm["id"])["last_exit"]["signal"] == signal.SIGKILL

    # A kernel panic: the guest reboots, which a VM (run with -no-reboot) does not survive.
    panic = "#!/bin/sh\necho c > /proc/sysrq-trigger\n"
    crasher = api.create_vm(user_data=panic, mem_mib=256)
    dead = stopped(api, crasher)
    assert dead["last_exit"]["reason"] == "guest-panic"
    assert "the guest's kernel panicked at " in dead["state_reason"]
    assert "Rebooting in" in dead["last_exit"]["console"][-1]
    assert second != first


# A guest that writes to its console as fast as it can, far past the bound (~3 MiB).
SPAM = """#!/bin/sh
sleep 2
i=0
while [ $i -lt 40000 ]; do
  i=$((i + 1))
  echo "line $i 0123456789012345678901234567890123456789012345678901234567890123456789"
done > /dev/console
echo "spam done" > /dev/console
"""


def test_the_console_is_readable_followable_private_and_bounded(daemon_factory) -> None:
    hatch = daemon_factory(HATCH_CONSOLE_MAX_BYTES=str(1 << 20))
    hatch.start()
    with hatch.client(hatch.create_key("alice")) as api:
        vm = api.create_vm(user_data=SPAM, mem_mib=256)
        followed = bytearray()
        seen = threading.Event()

        def follow() -> None:
            with hatch.client(hatch.create_key("alice")) as own:
                for chunk in own.follow_console(vm["id"], lines=1):
                    followed.extend(chunk)
                    if b"line 3000 " in followed:
                        seen.set()
                        return

        threading.Thread(target=follow, daemon=True).start()
        assert seen.wait(300), "following the console did not show the new output"
        assert b"hatchvm: guest ready" in followed  # what came between tail and spam too

        wait_for(lambda: "spam done" in api.console(vm["id"], lines=5), 300, "the spam")
        assert "hatchvm: guest ready" not in api.console(vm["id"], lines=10_000)  # rotated out
        vm_dir = hatch.data_dir / "vms" / vm["id"]
        assert (vm_dir / "console.log.1").exists()
        assert sum(p.stat().st_size for p in vm_dir.glob("console.log*")) <= 1 << 20
        tail = api.console(vm["id"], lines=3).splitlines()
        assert len(tail) == 3 and tail[0].startswith("line 40000 ") and tail[1] == "spam done"

        with hatch.client(hatch.create_key("mallory")) as other:
            with pytest.raises(HatchAPIError) as err:
                other.console(vm["id"])
            assert err.value.status == 404


def test_deaths_are_seen_after_a_daemon_restart_and_strays_are_ended(api, hatch) -> None:
    vm = api.create_vm(user_data=WEB, mem_mib=256)
    doomed = api.create_vm(user_data=WEB, mem_mib=256)
    boot_id(vm)
    hatch.kill()
    # A VMM whose row is gone (say, a delete that raced a boot under an older hatchd).
    with sqlite3.connect(hatch.data_dir / "hatchvm.db") as db:
        db.execute("DELETE FROM vms WHERE id = ?", (doomed["id"],))
    hatch.start()
    assert qemu_pids(doomed["id"]) == []
    assert "stray vmm process ended" in hatch.log_tail(200)

    [pid] = qemu_pids(vm["id"])
    os.kill(pid, signal.SIGKILL)  # reattached: hatchd watches it again
    dead = stopped(api, vm)
    assert "ended unexpectedly" in dead["state_reason"]
    assert dead["last_exit"]["signal"] is None  # not hatchd's child any more: unknown
