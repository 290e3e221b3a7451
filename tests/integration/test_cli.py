"""The `hatchvm` command against a real hatchd: tables, --json, one-line errors, exit codes."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.vm

HATCHVM = [sys.executable, "-m", "hatchvm.cli.main"]


def run(hatch, *args: str, key: str | None = None, stdin: str | None = None):
    env = {**os.environ, **hatch.env, "HATCH_API_URL": hatch.url}
    env.pop("HATCH_API_KEY", None)
    if key:
        env["HATCH_API_KEY"] = key
    return subprocess.run(
        [*HATCHVM, *args], env=env, input=stdin, capture_output=True, text=True, timeout=180
    )


@pytest.mark.postgres
def test_keys_create_list_revoke(hatch) -> None:
    created = run(hatch, "keys", "create", "--user", "carol")
    assert created.returncode == 0, created.stderr
    key = created.stdout.strip()
    assert key.startswith("hatch_") and "\n" not in key
    assert "not shown again" in created.stderr

    listed = json.loads(run(hatch, "keys", "list", "--json").stdout)
    mine = [k for k in listed if k["user_id"] == "carol"]
    assert len(mine) == 1 and key.startswith(mine[0]["prefix"])
    assert key not in json.dumps(listed)  # only a prefix and a hash are kept

    assert run(hatch, "vm", "list", key=key).returncode == 0
    revoked = run(hatch, "keys", "revoke", mine[0]["id"])
    assert revoked.returncode == 0 and mine[0]["id"] in revoked.stdout
    refused = run(hatch, "vm", "list", key=key)
    assert refused.returncode == 1
    assert refused.stderr.startswith("error: ") and "(HTTP 401)" in refused.stderr
    assert len(refused.stderr.strip().splitlines()) == 1


def test_vm_lifecycle_through_the_cli(hatch, tmp_path: Path) -> None:
    key = hatch.create_key("dave")
    script = tmp_path / "boot.sh"
    script.write_text("#!/bin/sh\necho hello > /root/hello\n")

    created = run(
        hatch, "vm", "create", "--no-network", "--egress", "none", "--mem", "256",
        "--user-data", str(script), "--json", key=key,
    )  # fmt: skip
    assert created.returncode == 0, created.stderr
    vm = json.loads(created.stdout)
    assert vm["state"] == "running" and vm["guest_ip"] is None and vm["mem_mib"] == 256
    assert vm["egress"] == "none"

    table = run(hatch, "vm", "list", key=key)
    assert table.returncode == 0
    header, *rows = table.stdout.strip().splitlines()
    assert header.split()[:3] == ["ID", "STATE", "IP"]
    assert len(rows) == 1 and rows[0].split()[:2] == [vm["id"], "running"]

    shown = run(hatch, "vm", "get", vm["id"], key=key)
    assert any(line.split()[:2] == ["state", "running"] for line in shown.stdout.splitlines())

    stopped = json.loads(run(hatch, "vm", "stop", vm["id"], "--json", key=key).stdout)
    assert stopped["state"] == "stopped"
    again = run(hatch, "vm", "stop", vm["id"], key=key)
    assert again.returncode == 1
    assert again.stderr.strip() == "error: vm is stopped, must be running (HTTP 409)"

    started = json.loads(run(hatch, "vm", "start", vm["id"], "--json", key=key).stdout)
    assert started["state"] == "running"

    deleted = run(hatch, "vm", "delete", vm["id"], key=key)
    assert deleted.returncode == 0 and deleted.stdout.strip() == f"deleted {vm['id']}"
    gone = run(hatch, "vm", "get", vm["id"], key=key)
    assert gone.returncode == 1 and "(HTTP 404)" in gone.stderr
    assert json.loads(run(hatch, "vm", "list", "--json", key=key).stdout) == []


def test_images_are_listed(hatch) -> None:
    key = hatch.create_key("erin")
    images = json.loads(run(hatch, "image", "list", "--json", key=key).stdout)
    assert [i["id"] for i in images] == ["img_default"]
    shown = run(hatch, "image", "get", "img_default", key=key)
    assert shown.returncode == 0 and "kernel_path" in shown.stdout
    built = run(hatch, "image", "build")  # already built: reused, and says so
    assert built.returncode == 0, built.stderr
    assert "already built" in built.stderr


def test_bad_input_is_one_clear_line(hatch, tmp_path: Path) -> None:
    key = hatch.create_key("frank")
    cases = [
        (("vm", "create", "--mem", "1"), "mem_mib"),
        (("vm", "create", "--user-data", str(tmp_path / "missing.sh")), "--user-data"),
        (("vm", "get", "vm_doesnotexist"), "not found"),
    ]
    for args, needle in cases:
        result = run(hatch, *args, key=key)
        assert result.returncode == 1, args
        lines = result.stderr.strip().splitlines()
        assert len(lines) == 1 and lines[0].startswith("error: ") and needle in lines[0], lines
    wrong_url = subprocess.run(
        [*HATCHVM, "--url", "http://127.0.0.1:1", "vm", "list"],
        capture_output=True, text=True, timeout=60,
    )  # fmt: skip
    assert wrong_url.returncode == 1
    assert wrong_url.stderr.startswith("error: cannot reach hatchd at http://127.0.0.1:1")


def test_snapshots_and_routes_through_the_cli(hatch) -> None:
    key = hatch.create_key("grace")
    vm = json.loads(run(hatch, "vm", "create", "--mem", "256", "--json", key=key).stdout)

    snap = json.loads(run(hatch, "vm", "snapshot", vm["id"], "--wait", "--json", key=key).stdout)
    assert snap["id"].startswith("snap_") and snap["vm_id"] == vm["id"]
    assert snap["status"] == "stored"  # --wait: returned once stored, not once captured
    table = run(hatch, "snapshot", "list", vm["id"], key=key)
    header, *rows = table.stdout.strip().splitlines()
    assert header.split()[:4] == ["ID", "VM", "STATUS", "SIZE"]
    assert len(rows) == 1 and rows[0].split()[:3] == [snap["id"], vm["id"], "stored"]
    shown = run(hatch, "snapshot", "get", snap["id"], key=key)
    assert "mem (stored/raw)" in shown.stdout and "local:" in shown.stdout
    restored = json.loads(run(hatch, "vm", "restore", vm["id"], "--json", key=key).stdout)
    assert restored["state"] == "running"
    again = run(hatch, "vm", "restore", vm["id"], "--snapshot", snap["id"], key=key)
    assert again.stderr.strip() == "error: vm is running, must be snapshotted (HTTP 409)"

    route = json.loads(
        run(
            hatch, "route", "create", vm["id"], "--port", "8080", "--subdomain", "clitest",
            "--no-wake", "--json", key=key,
        ).stdout
    )  # fmt: skip
    assert route["subdomain"] == "clitest" and route["auto_wake"] is False
    listed = run(hatch, "route", "list", vm["id"], key=key).stdout
    assert route["url"] in listed
    reserved = run(
        hatch, "route", "create", vm["id"], "--port", "80", "--subdomain", "api", key=key
    )
    assert reserved.stderr.strip() == "error: subdomain: 'api' is reserved (HTTP 400)"
    assert run(hatch, "route", "delete", route["id"], key=key).stdout.strip() == (
        f"deleted {route['id']}"
    )
    assert run(hatch, "snapshot", "delete", snap["id"], key=key).returncode == 0
    assert json.loads(run(hatch, "snapshot", "list", vm["id"], "--json", key=key).stdout) == []
