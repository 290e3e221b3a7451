"""The SSH gateway (a real ssh client, the guest's real dropbear) and the idle reaper."""

from __future__ import annotations

import asyncio
import shutil
import socket
from pathlib import Path

import aiohttp
import pytest

from tests.integration.test_routes_proxy import WEB_SERVER, restores_of, via_proxy
from tests.support.ssh import ssh, ssh_key
from tests.support.wait import wait_for, wait_http

pytestmark = pytest.mark.vm


def banner_from(port: int, source: str) -> bytes:
    with socket.create_connection(("127.0.0.1", port), timeout=30, source_address=(source, 0)) as s:
        s.settimeout(30)
        try:
            return s.recv(100)
        except (ConnectionResetError, TimeoutError):
            return b""


def knock(port: int, send: bytes, wait: bool) -> bytes:
    """What a port scanner or another protocol does: connect, maybe send, maybe wait."""
    with socket.create_connection(("127.0.0.1", port), timeout=30) as s:
        if send:
            s.sendall(send)
        if not wait:
            return b""
        s.settimeout(30)
        try:
            return s.recv(100)  # the gateway closes it: nothing comes back
        except (ConnectionResetError, TimeoutError):
            return b""


def test_ssh_through_the_gateway_wakes_a_snapshotted_vm(daemon_factory, tmp_path) -> None:
    hatch = daemon_factory(HATCH_SSH_ALLOWED_CIDR="127.0.0.1/32", HATCH_SSH_BANNER_TIMEOUT="2")
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
        # A bare connect, a silent client and another protocol wake nothing.
        assert knock(vm["ssh_port"], b"", wait=False) == b""
        assert knock(vm["ssh_port"], b"", wait=True) == b""  # until the 2 s wait ends
        assert knock(vm["ssh_port"], b"GET / HTTP/1.1\r\nHost: x\r\n\r\n", wait=True) == b""
        assert api.get_vm(vm["id"])["state"] == "snapshotted"
        assert restores_of(hatch, vm["id"]) == 0
        # OpenSSH sends its identification line at once, without waiting for the server's.
        out = ssh(key, vm["ssh_port"], "cat /proc/sys/kernel/random/boot_id; echo ok")
        assert out.returncode == 0, out.stderr
        assert out.stdout.split() == [boot, "ok"]  # the same guest, woken by the connection
        assert api.get_vm(vm["id"])["state"] == "running"

        api.delete_vm(vm["id"])
        with pytest.raises(OSError):
            socket.create_connection(("127.0.0.1", vm["ssh_port"]), timeout=5).close()


async def websocket_echo(hatch, subdomain: str, messages: list[str]) -> list[str]:
    """Each message through the proxy to the guest's echo server and back."""
    url = f"http://127.0.0.1:{hatch.proxy_port}/"
    host = {"Host": f"{subdomain}.hatch.local"}
    answers = []
    timeout = aiohttp.ClientWSTimeout(ws_receive=60)
    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=180)) as session:
        async with session.ws_connect(url, headers=host, timeout=timeout) as sock:
            for message in messages:
                await sock.send_str(message)
                answers.append((await sock.receive(timeout=60)).data)
    return answers


@pytest.mark.skipif(
    shutil.which("websocketd") is None, reason="websocketd (installed by scripts/test) is missing"
)
def test_websocket_echo_through_the_proxy_wakes_a_snapshotted_vm(daemon_factory, tmp_path):
    hatch = daemon_factory(HATCH_SSH_ALLOWED_CIDR="127.0.0.1/32")
    hatch.start()
    key, public = ssh_key(tmp_path)
    server = Path(shutil.which("websocketd") or "")
    with hatch.client(hatch.create_key("alice")) as api:
        vm = api.create_vm(user_data=f"#!/bin/sh\n# ssh-authorized-key: {public}\n", mem_mib=256)
        wait_for(lambda: ssh(key, vm["ssh_port"], "true", 20).returncode == 0, 180, "guest ssh")
        # The guest's WebSocket server: websocketd (from the host's Debian package) runs
        # `cat`, so every message comes back as it went.
        with server.open("rb") as binary:
            install = ssh(
                key,
                vm["ssh_port"],
                "cat > /root/websocketd && chmod +x /root/websocketd && "
                "(/root/websocketd --port 8081 cat </dev/null >/dev/null 2>&1 &)",
                timeout=270,
                stdin=binary,
            )
        assert install.returncode == 0, install.stderr
        api.create_route(vm["id"], target_port=8081, subdomain="echo")
        wait_for(lambda: port_open(vm["guest_ip"], 8081), 60, "websocketd in the guest")

        messages = ["hello", "x" * 100_000, "ünïcödé"]
        assert asyncio.run(websocket_echo(hatch, "echo", messages)) == messages

        api.snapshot_vm(vm["id"])
        assert api.get_vm(vm["id"])["state"] == "snapshotted"
        # The upgrade request itself wakes the VM; the echo server is still there.
        assert asyncio.run(websocket_echo(hatch, "echo", ["awake?"])) == ["awake?"]
        assert api.get_vm(vm["id"])["state"] == "running"


def port_open(host: str, port: int) -> bool:
    try:
        socket.create_connection((host, port), timeout=2).close()
        return True
    except OSError:
        return False


@pytest.mark.postgres
def test_idle_reaper_snapshots_only_idle_vms_with_a_waking_route(daemon_factory) -> None:
    hatch = daemon_factory(
        HATCH_IDLE_CHECK_INTERVAL="1", HATCH_IDLE_TIMEOUT="5", HATCH_MAX_SNAPSHOTS_PER_VM="2"
    )
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

        # At the quota (2 here) the reaper prunes its own oldest snapshot, never the user's.
        manual = api.snapshot_vm(idle["id"])
        api.restore_vm(idle["id"])
        wait_for(lambda: api.get_vm(idle["id"])["state"] == "snapshotted", 120, "the second freeze")
        # Room is made once the new snapshot is stored.
        wait_for(lambda: len(api.list_snapshots(idle["id"])) == 2, 300, "room made")
        kept = {s["id"]: s["automatic"] for s in api.list_snapshots(idle["id"])}
        assert kept[manual["id"]] is False
        assert snap["id"] not in kept  # the older automatic one made room
        assert via_proxy(hatch, "idle", "/boot_id").text == boot
