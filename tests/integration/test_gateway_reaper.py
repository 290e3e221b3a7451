"""The SSH gateway (a real ssh client, the guest's real dropbear) and the idle reaper."""

from __future__ import annotations

import socket
import subprocess
from pathlib import Path

import pytest

from tests.integration.test_routes_proxy import WEB_SERVER, via_proxy
from tests.support.wait import wait_for, wait_http

pytestmark = pytest.mark.vm


def ssh_key(tmp_path: Path) -> tuple[Path, str]:
    key = tmp_path / "id_ed25519"
    subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", str(key)], check=True)
    return key, (tmp_path / "id_ed25519.pub").read_text().strip()


def ssh(
    key: Path, port: int, command: str, timeout: float = 120
) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [
            "ssh",
            "-i", str(key),
            "-p", str(port),
            "-o", "BatchMode=yes",
            "-o", "StrictHostKeyChecking=no",
            "-o", "UserKnownHostsFile=/dev/null",
            "-o", "LogLevel=ERROR",
            "-o", f"ConnectTimeout={int(timeout)}",
            "root@127.0.0.1",
            command,
        ],
        capture_output=True,
        text=True,
        timeout=timeout + 30,
    )  # fmt: skip


def banner_from(port: int, source: str) -> bytes:
    with socket.create_connection(("127.0.0.1", port), timeout=30, source_address=(source, 0)) as s:
        s.settimeout(30)
        try:
            return s.recv(100)
        except (ConnectionResetError, TimeoutError):
            return b""


def test_ssh_through_the_gateway_wakes_a_snapshotted_vm(daemon_factory, tmp_path) -> None:
    hatch = daemon_factory(HATCH_SSH_ALLOWED_CIDR="127.0.0.1/32")
    hatch.start()
    key, public = ssh_key(tmp_path)
    with hatch.client(hatch.create_key("alice")) as api:
        vm = api.create_vm(user_data=f"{WEB_SERVER}# ssh-authorized-key: {public}\n", mem_mib=256)
        boot = wait_http(f"http://{vm['guest_ip']}:8080/boot_id").strip()

        def logged_in() -> str | None:
            out = ssh(key, vm["ssh_port"], "cat /proc/sys/kernel/random/boot_id", timeout=20)
            return out.stdout.strip() if out.returncode == 0 else None

        assert wait_for(logged_in, 180, "ssh through the gateway") == boot
        assert banner_from(vm["ssh_port"], "127.0.0.2") == b""  # outside the allowed CIDR

        api.snapshot_vm(vm["id"])
        assert api.get_vm(vm["id"])["state"] == "snapshotted"
        out = ssh(key, vm["ssh_port"], "cat /proc/sys/kernel/random/boot_id; echo ok")
        assert out.returncode == 0, out.stderr
        assert out.stdout.split() == [boot, "ok"]  # the same guest, woken by the connection
        assert api.get_vm(vm["id"])["state"] == "running"

        api.delete_vm(vm["id"])
        with pytest.raises(OSError):
            socket.create_connection(("127.0.0.1", vm["ssh_port"]), timeout=5).close()


def test_idle_reaper_snapshots_only_idle_vms_with_a_waking_route(daemon_factory) -> None:
    hatch = daemon_factory(HATCH_IDLE_CHECK_INTERVAL="1", HATCH_IDLE_TIMEOUT="5")
    hatch.start()
    with hatch.client(hatch.create_key("alice")) as api:
        idle = api.create_vm(user_data=WEB_SERVER, mem_mib=256)
        unrouted = api.create_vm(user_data=WEB_SERVER, mem_mib=256)
        boot = wait_http(f"http://{idle['guest_ip']}:8080/boot_id")
        api.create_route(idle["id"], target_port=8080, subdomain="idle")
        api.create_route(unrouted["id"], target_port=8080, auto_wake=False)

        wait_for(
            lambda: api.get_vm(idle["id"])["state"] == "snapshotted", 120, "the reaper's snapshot"
        )
        [snap] = api.list_snapshots(idle["id"])
        assert snap["automatic"] is True
        assert api.get_vm(unrouted["id"])["state"] == "running"  # no route wakes it: left alone

        response = via_proxy(hatch, "idle", "/boot_id")
        assert response.status_code == 200 and response.text == boot
        assert api.get_vm(idle["id"])["state"] == "running"
