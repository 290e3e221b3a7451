"""Warm templates with real guests: after the first create of a shape a template is built in
the background, and the next creates of that shape are forked from it (the log says so, and
the guest's kernel command line is the template's boot's), each its own machine exactly as a
cold boot makes it (hostname, address, MAC, SSH host keys, authorized keys, machine id), its
user_data run once; the template's VM is in no listing or quota; a rebuilt image gets a new
template; a broken template falls back to a cold boot; templates off: every create boots;
hatchd killed anywhere in a template build leaves nothing behind."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from hatchvm.client import HatchAPIError, HatchClient
from hatchvm.net.alloc import tap_name
from tests.integration.test_image_versions import rebuilt_copy
from tests.integration.test_kill_anywhere import in_guests_set
from tests.support.daemon import HatchDaemon
from tests.support.host import link_exists, pinned_addresses, qemu_pids
from tests.support.ssh import host_key, ssh, ssh_key
from tests.support.wait import wait_for, wait_http

pytestmark = pytest.mark.vm

# user_data in the examples/web.sh style: a web server whose CGI says who answers; each run
# of the script adds a line to /root/runs (on the VM's disk).
WHO = r"""#!/bin/sh
echo run >> /root/runs
mkdir -p /srv/www/cgi-bin
cat > /srv/www/cgi-bin/who <<'EOF'
#!/bin/sh
printf 'Content-Type: text/plain\r\n\r\n'
echo "name=$(hostname)"
echo "etc_hostname=$(cat /etc/hostname)"
echo "addr=$(ip -4 -o addr show dev eth0 | awk '{print $4}')"
echo "mac=$(cat /sys/class/net/eth0/address)"
echo "runs=$(wc -l < /root/runs)"
echo "logged=$(grep -c '^--- boot' /var/log/user-data.log)"
echo "booted_as=$(tr ' ' '\n' < /proc/cmdline | sed -n 's/^hatch.hostname=//p')"
echo "machine=$(cat /etc/machine-id 2>/dev/null)"
echo "random=$(head -c 16 /dev/urandom | od -An -tx1 | tr -d ' \n')"
echo "keys=$(cat /root/.ssh/authorized_keys | tr '\n' '|')"
EOF
chmod 755 /srv/www/cgi-bin/who
busybox httpd -p 8080 -h /srv/www
"""
SHAPE = {"mem_mib": 256}


def created_from_template(hatch: HatchDaemon, vm_id: str) -> bool:
    (record,) = [r for r in hatch.events("vm created") if r.get("vm_id") == vm_id]
    return bool(record["from_template"])


def wait_template_ready(hatch: HatchDaemon, count: int = 1) -> None:
    wait_for(lambda: len(hatch.events("template ready")) >= count, 240, "a template")


def in_disk(disk: Path, path: str) -> bool:
    """Whether the ext4 image holds path (read with debugfs, nothing mounted)."""
    out = subprocess.run(
        ["debugfs", "-R", f"stat {path}", str(disk)], capture_output=True, text=True, check=True
    )
    return "Inode:" in out.stdout


def who(vm: dict[str, Any]) -> dict[str, str]:
    text = wait_http(f"http://{vm['guest_ip']}:8080/cgi-bin/who", timeout=120)
    return dict(line.split("=", 1) for line in text.strip().splitlines())


def templates(hatch: HatchDaemon) -> list[str]:
    root = hatch.data_dir / "templates"
    return sorted(p.name for p in root.iterdir()) if root.exists() else []


@pytest.fixture(scope="module")
def hatch() -> Iterator[HatchDaemon]:
    daemon = HatchDaemon(HATCH_TEMPLATES="true", HATCH_MAX_VMS_PER_USER="3")
    try:
        daemon.start()
        yield daemon
    finally:
        daemon.cleanup()


@pytest.fixture(scope="module")
def alice(hatch: HatchDaemon) -> Iterator[HatchClient]:
    with hatch.client(hatch.create_key("alice")) as client:
        yield client


def test_creates_after_the_first_come_from_its_template(
    hatch: HatchDaemon, alice: HatchClient, tmp_path: Path
) -> None:
    key, public = ssh_key(tmp_path)
    user_data = WHO + f"# ssh-authorized-key: {public}\n"
    cold = alice.create_vm(**SHAPE, user_data=user_data)
    assert not created_from_template(hatch, cold["id"])

    # The build's VM runs (positive control), owned by nobody: not listed, not found.
    building = wait_for(lambda: hatch.events("template building"), 120, "a template build")
    template_vm = building[0]["vm_id"]
    wait_for(lambda: qemu_pids(template_vm) or hatch.events("template ready"), 60, "its VM")
    assert [vm["id"] for vm in alice.list_vms()] == [cold["id"]]
    with pytest.raises(HatchAPIError) as missing:
        alice.get_vm(template_vm)
    assert missing.value.status == 404
    wait_template_ready(hatch)
    assert qemu_pids(template_vm) == []  # captured, then ended
    (name,) = templates(hatch)
    # Its disk holds nothing of any user's: no user_data, no authorized keys.
    disk = hatch.data_dir / "templates" / name / "disk"
    assert in_disk(disk, "/upper/etc/hostname")  # positive control
    assert not in_disk(disk, "/upper/etc/hatch/user-data")
    assert not in_disk(disk, "/upper/root/.ssh/authorized_keys")

    first = alice.create_vm(**SHAPE, user_data=user_data)
    second = alice.create_vm(**SHAPE, user_data=user_data)
    assert created_from_template(hatch, first["id"])
    assert created_from_template(hatch, second["id"])
    for vm in (first, second):  # one took the spare copy (if made yet), the other copied
        vm_dir = hatch.data_dir / "vms" / vm["id"]
        assert (vm_dir / "mem").stat().st_nlink == 1 and not (vm_dir / "mem-private").exists()
    exposed = httpx.get(hatch.url + "/metrics", timeout=30).text
    assert 'hatch_create_duration_seconds_count{how="template"} 2.0' in exposed
    assert 'hatch_create_duration_seconds_count{how="cold_boot"} 1.0' in exposed
    # Quotas count only the user's VMs: three of three, the template's not among them.
    assert len(alice.list_vms()) == 3
    with pytest.raises(HatchAPIError) as full:
        alice.create_vm(**SHAPE)
    assert full.value.status == 403

    seen = {vm["id"]: who(vm) for vm in (cold, first, second)}
    for vm in (cold, first, second):
        me = seen[vm["id"]]
        name = vm["id"].replace("_", "-")
        assert me["name"] == me["etc_hostname"] == name, me
        assert me["addr"] == f"{vm['guest_ip']}/24", me
        assert me["mac"] == vm["guest_mac"], me
        assert me["runs"] == "1" and me["logged"] == "1", me  # its user_data ran once
        assert me["keys"] == f"{public}|", me
        assert ssh(key, vm["ssh_port"], "hostname").stdout.strip() == name
    # Booted (its own name on its kernel command line) against forked (the template's).
    assert seen[cold["id"]]["booted_as"] == cold["id"].replace("_", "-")
    for vm in (first, second):
        assert seen[vm["id"]]["booted_as"] == template_vm.replace("_", "-")
    for field in ("machine", "random"):
        assert len({me[field] for me in seen.values()}) == 3, field
    keys = {host_key(vm["ssh_port"], tmp_path) for vm in (cold, first, second)}
    assert len(keys) == 3

    # Their lives go on as any VM's: a snapshot and restore resumes it as it was; a stop and
    # start boots it (its own kernel command line now) and runs its user_data again.
    alice.snapshot_vm(first["id"])
    alice.restore_vm(first["id"])
    after = who(first)
    assert (after["runs"], after["machine"]) == ("1", seen[first["id"]]["machine"])
    alice.stop_vm(second["id"])
    alice.start_vm(second["id"])
    again = who(second)
    assert again["runs"] == "2" and again["booted_as"] == second["id"].replace("_", "-")
    assert again["name"] == second["id"].replace("_", "-")
    for vm in (cold, first, second):
        alice.delete_vm(vm["id"])


def _template_dir(hatch: HatchDaemon, **shape: Any) -> Path | None:
    for name in templates(hatch):
        path = hatch.data_dir / "templates" / name
        try:
            found = json.loads((path / "shape.json").read_text())
        except (OSError, ValueError):
            continue
        if all(found.get(k) == v for k, v in shape.items()):
            return path
    return None


def test_a_vm_from_its_template_has_memory_of_its_own(
    hatch: HatchDaemon, alice: HatchClient
) -> None:
    """Not the template's memory mapped privately: that would put the guest's whole RAM into
    every snapshot's state (its capture a RAM migration, each of its snapshots as big as the
    first, its wakes loading all of it). It takes the copy made ahead, the spare."""
    shape = {"mem_mib": SHAPE["mem_mib"], "enable_network": True}
    if _template_dir(hatch, **shape) is None:  # run alone: the first create builds it
        alice.delete_vm(alice.create_vm(**SHAPE)["id"])
        wait_template_ready(hatch)
    template = _template_dir(hatch, **shape)
    assert template is not None
    spare = wait_for(lambda: (template / "spare-mem").exists(), 60, "the spare copy")
    assert spare
    spare_ino = (template / "spare-mem").stat().st_ino

    vm = alice.create_vm(**SHAPE, user_data=WHO)
    assert created_from_template(hatch, vm["id"])
    vm_dir = hatch.data_dir / "vms" / vm["id"]
    mem = vm_dir / "mem"
    assert mem.stat().st_ino == spare_ino and mem.stat().st_nlink == 1  # taken, not copied
    assert not (vm_dir / "mem-private").exists()
    assert mem.stat().st_ino != (template / "mem").stat().st_ino
    renewed = wait_for(lambda: (template / "spare-mem").exists(), 60, "the next spare")
    assert renewed and (template / "spare-mem").stat().st_ino != spare_ino
    assert who(vm)["name"] == vm["id"].replace("_", "-")

    # Its snapshots hold only what changed: the second, the guest idle in between, stores
    # a fraction of the first, as a booted VM's does.
    first = alice.snapshot_vm(vm["id"], wait_stored=True)
    alice.restore_vm(vm["id"])
    second = alice.snapshot_vm(vm["id"], wait_stored=True)
    assert second["size_bytes"] <= first["size_bytes"] // 10, (first, second)
    alice.restore_vm(vm["id"])
    assert who(vm)["name"] == vm["id"].replace("_", "-")
    alice.delete_vm(vm["id"])


def test_a_vm_without_network_from_its_template(hatch: HatchDaemon, alice: HatchClient) -> None:
    shape = {**SHAPE, "enable_network": False, "user_data": "#!/bin/sh\necho run >> /root/runs\n"}
    cold = alice.create_vm(**shape)
    wait_template_ready(hatch, 2)
    warm = alice.create_vm(**shape)
    assert created_from_template(hatch, warm["id"])
    for vm in (cold, warm):
        name = vm["id"].replace("_", "-")
        assert alice.exec(vm["id"], "hostname")["stdout"].strip() == name
        runs = wait_for(lambda vm=vm: alice.exec(vm["id"], "cat /root/runs")["stdout"], 60, "a run")
        assert runs == "run\n"
        alice.delete_vm(vm["id"])


def test_a_rebuilt_image_gets_a_new_template(hatch: HatchDaemon, alice: HatchClient) -> None:
    old = templates(hatch)
    assert len(old) == 2  # the previous tests' (with and without network)
    image_dir = hatch.data_dir / "images" / "img_default"
    version = alice.get_image("img_default")["version"]
    second = rebuilt_copy(image_dir, version)
    subprocess.run(
        [sys.executable, "-m", "hatchvm.cli.main", "image", "build"],
        env={**os.environ, **hatch.env},
        check=True,
        capture_output=True,
        timeout=120,
    )  # registers the version already there (as in test_image_versions.py)
    assert alice.get_image("img_default")["version"] == second
    vm = alice.create_vm(**SHAPE, user_data=WHO)  # a new version: no template for it yet
    assert not created_from_template(hatch, vm["id"])
    wait_template_ready(hatch, 3)
    new = templates(hatch)
    assert len(new) == 2 and new != old  # the new version's; the old one retired
    again = alice.create_vm(**SHAPE, user_data=WHO)
    assert created_from_template(hatch, again["id"])
    assert again["image_version"] == second
    assert who(again)["runs"] == "1"
    for made in (vm, again):
        alice.delete_vm(made["id"])


def test_a_broken_template_falls_back_to_a_cold_boot(
    hatch: HatchDaemon, alice: HatchClient
) -> None:
    for name in templates(hatch):
        (hatch.data_dir / "templates" / name / "state").write_bytes(b"not a device state")
    vm = alice.create_vm(**SHAPE, user_data=WHO)
    assert not created_from_template(hatch, vm["id"])
    me = who(vm)
    assert me["booted_as"] == vm["id"].replace("_", "-") and me["runs"] == "1"
    assert [r["vm_id"] for r in hatch.events("start from a template failed, booting cold")] == [
        vm["id"]
    ]
    # Its booted QEMU is watched like any VM's: a death is seen (not only the template's run).
    (pid,) = qemu_pids(vm["id"])
    os.kill(pid, signal.SIGKILL)
    stopped = wait_for(
        lambda: (got := alice.get_vm(vm["id"]))["state"] == "stopped" and got, 60, "its death"
    )
    assert "killed" in stopped["state_reason"] or "signal" in stopped["state_reason"], stopped
    alice.delete_vm(vm["id"])


def test_templates_off_every_create_boots(daemon_factory: Any) -> None:
    hatch = daemon_factory(HATCH_TEMPLATES="false")
    hatch.start()
    with hatch.client(hatch.create_key("alice")) as api:
        made = [api.create_vm(**SHAPE, user_data=WHO) for _ in range(2)]
        for vm in made:
            assert not created_from_template(hatch, vm["id"])
            assert who(vm)["booted_as"] == vm["id"].replace("_", "-")
    assert hatch.events("template building") == [] and templates(hatch) == []


@pytest.mark.parametrize(
    "point", ["template.reserved", "template.booted", "template.captured", "template.stored"]
)
def test_hatchd_killed_in_a_template_build(daemon_factory: Any, point: str) -> None:
    hatch = daemon_factory(HATCH_TEMPLATES="true", HATCH_CRASH_AT=point, HATCH_VM_DISK_MIB="64")
    hatch.start()
    key = hatch.create_key("alice")
    with hatch.client(key) as api:
        worker = threading.Thread(target=lambda: _swallow(lambda: api.create_vm(**SHAPE)))
        worker.start()
        assert hatch.proc is not None
        hatch.proc.wait(240)  # it dies at the crash point, in the build after the create
        worker.join(60)
    assert f'"point": "{point}"' in hatch.log_tail(20)
    (building,) = hatch.events("template building")
    template_vm = building["vm_id"]
    del hatch.env["HATCH_CRASH_AT"]
    hatch.start()
    # Nothing of the build is left: no process, no TAP, no half-made template.
    assert qemu_pids(template_vm) == []
    assert not link_exists(tap_name(hatch.tap_prefix, template_vm))
    assert not (hatch.data_dir / "vms" / template_vm).exists()
    tap = tap_name(hatch.tap_prefix, template_vm)
    assert building["ip"] and building["ip"] not in pinned_addresses(hatch.bridge)
    assert not in_guests_set(hatch, tap)
    done = point == "template.stored"
    left = templates(hatch)  # a finished template, or nothing (no half-built or old one)
    assert len(left) == (1 if done else 0) and all("." not in name for name in left), left
    with hatch.client(key) as api:
        (vm,) = api.list_vms()  # the user's VM, booted before the build began
        assert vm["state"] == "running", vm
        made = api.create_vm(**SHAPE, user_data=WHO)
        assert created_from_template(hatch, made["id"]) == done
        assert who(made)["runs"] == "1"
    if done:  # other DNS servers for the guests: the template (its resolv.conf) goes
        assert len(templates(hatch)) == 1
        hatch.stop()
        hatch.env["HATCH_GUEST_DNS"] = "9.9.9.9"
        hatch.start()
        assert templates(hatch) == []


def _swallow(call: Callable[[], object]) -> None:
    try:
        call()
    except Exception:
        pass  # the daemon may die before it answers


def test_hatchd_killed_starting_a_vm_from_its_template(daemon_factory: Any) -> None:
    hatch = daemon_factory(HATCH_TEMPLATES="true", HATCH_VM_DISK_MIB="64")
    hatch.start()
    key = hatch.create_key("alice")
    with hatch.client(key) as api:
        cold = api.create_vm(**SHAPE)
        wait_template_ready(hatch)
    hatch.stop()
    hatch.env["HATCH_CRASH_AT"] = "fork.child-resumed"  # still the template's identity
    hatch.start()
    with hatch.client(key) as api:
        worker = threading.Thread(target=lambda: _swallow(lambda: api.create_vm(**SHAPE)))
        worker.start()
        assert hatch.proc is not None
        hatch.proc.wait(240)
        worker.join(60)
    assert '"point": "fork.child-resumed"' in hatch.log_tail(20)
    del hatch.env["HATCH_CRASH_AT"]
    hatch.start()
    with hatch.client(key) as api:
        (broken,) = [vm for vm in api.list_vms() if vm["id"] != cold["id"]]
        # It never runs as the template: no process, no TAP, an error the user can delete.
        assert broken["state"] == "error" and "interrupted" in broken["state_reason"], broken
        assert qemu_pids(broken["id"]) == []
        assert not link_exists(tap_name(hatch.tap_prefix, broken["id"]))
        api.delete_vm(broken["id"])
        made = api.create_vm(**SHAPE, user_data=WHO)
        assert created_from_template(hatch, made["id"])
        assert who(made)["runs"] == "1"


def test_the_least_recently_used_template_goes_beyond_the_limit(daemon_factory: Any) -> None:
    hatch = daemon_factory(HATCH_TEMPLATES="true", HATCH_MAX_TEMPLATES="1")
    hatch.start()
    with hatch.client(hatch.create_key("alice")) as api:
        small = api.create_vm(mem_mib=128)
        wait_template_ready(hatch)
        (first,) = templates(hatch)
        api.delete_vm(small["id"])
        big = api.create_vm(mem_mib=256)  # another shape: boots, then its template
        assert not created_from_template(hatch, big["id"])
        wait_template_ready(hatch, 2)
        (second,) = templates(hatch)  # one kept: the newer
        assert second != first
        again = api.create_vm(mem_mib=256)
        assert created_from_template(hatch, again["id"])
    # Turned off, templates are removed at start-up (their disk space is the host's again).
    hatch.stop()
    hatch.env["HATCH_TEMPLATES"] = "false"
    hatch.start()
    assert templates(hatch) == []


def test_a_failed_build_leaves_nothing_and_creates_boot(daemon_factory: Any) -> None:
    # The template's guest agent "does not answer" in time: its build fails after the boot.
    hatch = daemon_factory(HATCH_TEMPLATES="true", HATCH_AGENT_READY_TIMEOUT="0.001")
    hatch.start()
    with hatch.client(hatch.create_key("alice")) as api:
        first = api.create_vm(**SHAPE)
        failed = wait_for(lambda: hatch.events("template build failed"), 120, "the failure")
        assert "did not" in failed[0]["reason"] or "timed out" in failed[0]["reason"], failed
        (building,) = hatch.events("template building")
        assert qemu_pids(building["vm_id"]) == []
        assert not link_exists(tap_name(hatch.tap_prefix, building["vm_id"]))
        assert templates(hatch) == []
        second = api.create_vm(**SHAPE)  # boots, and the shape is not tried again
        assert not created_from_template(hatch, second["id"])
        assert len(hatch.events("template building")) == 1
        assert {vm["id"] for vm in api.list_vms()} == {first["id"], second["id"]}
